# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Access to the zstandard binding, with an error that says what to install.

Modules run on the target host, which may lack the library; importing this
file never fails, only using zstd without the library does.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.vmimage.qemu.plugins.module_utils.errors import missing_library

try:
    import zstandard as _zstandard
    ZSTD_IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - exercised on hosts without the library
    _zstandard = None
    ZSTD_IMPORT_ERROR = _exc


def zstd_module():
    if _zstandard is None:
        raise missing_library('zstandard', 'python3-zstandard', 'zstandard', ZSTD_IMPORT_ERROR)
    return _zstandard
