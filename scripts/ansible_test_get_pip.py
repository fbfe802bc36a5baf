# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Stand-in for the get-pip.py bootstrap script ansible-test downloads.

ansible-test creates a virtualenv per sanity test without pip and fills it by
running ``get-pip-<version>.py`` from ci-files.testing.ansible.com, a host that
is not always reachable (CI behind a proxy, offline mirrors).  It looks in
``~/.ansible/test/cache/get_pip_<version>.py`` first; scripts/sanity.sh puts
this file there when that cache entry is missing.  It gets pip from the
interpreter's own ``ensurepip`` and then lets that pip install what ansible-test
asked for (the pinned pip version), which only needs the package index.

ansible-test calls it as ``python get_pip.py [pip options] pip==X [--no-setuptools]
[--no-wheel]``; the two ``--no-*`` flags belong to get-pip.py only, pip
itself does not install setuptools or wheel unless asked.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import subprocess
import sys

GET_PIP_ONLY_FLAGS = ('--no-setuptools', '--no-wheel')


def main(argv):
    subprocess.run([sys.executable, '-m', 'ensurepip', '--default-pip'],
                   stdout=subprocess.DEVNULL, check=True)
    args = [arg for arg in argv if arg not in GET_PIP_ONLY_FLAGS]
    return subprocess.run([sys.executable, '-m', 'pip', 'install'] + args, check=False).returncode


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
