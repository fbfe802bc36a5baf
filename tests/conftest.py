"""Make the checkout importable as ``ansible_collections.vmimage.qemu``.

The library's modules import each other by their collection path (as every
collection does), so tests need a tree ``<root>/ansible_collections/vmimage/qemu``
pointing at this checkout.  It is made once under ``build/`` and exported as
ANSIBLE_COLLECTIONS_PATH so tests that run ``ansible`` itself find the same code.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _collection_root():
    try:
        import ansible_collections.vmimage.qemu  # noqa: F401  (ansible-test units provides it)
        return None
    except ImportError:
        pass
    root = os.path.join(REPO, 'build', 'collections')
    link = os.path.join(root, 'ansible_collections', 'vmimage', 'qemu')
    if not os.path.islink(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        try:
            os.symlink(REPO, link)
        except FileExistsError:
            pass
    return root


_ROOT = _collection_root()
if _ROOT is not None:
    sys.path.insert(0, _ROOT)
    os.environ['ANSIBLE_COLLECTIONS_PATH'] = _ROOT
sys.path.insert(0, os.path.join(REPO, 'tests'))
