# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small real file systems for failure tests: a full disk or a read-only
one is a tmpfs of a few MiB, not a mock of os.write."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import os
import subprocess

import pytest


@contextlib.contextmanager
def mounted_tmpfs(path, options):
    """A tmpfs at ``path`` (created) with mount ``options`` (e.g.
    ``size=1m,mode=0755``), unmounted afterwards.  Skips the test where
    mounting is not allowed (not root, no mount namespace rights)."""
    os.makedirs(path)
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', path],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        pytest.skip('cannot mount a tmpfs here: %s' % proc.stderr.decode().strip())
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', path], check=True)


def remount_read_only(path):
    """Turn the tmpfs at ``path`` read-only (EROFS for every write)."""
    subprocess.run(['mount', '-o', 'remount,ro', path], check=True)
