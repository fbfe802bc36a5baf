# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Write-behind: write-back is started every window while a file is
written, never for nothing, and a descriptor that cannot take it (a pipe)
turns it off instead of failing the write."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from ansible_collections.vmimage.qemu.plugins.module_utils._core import writeback
from ansible_collections.vmimage.qemu.plugins.module_utils._core.writeback import WriteBehind, sync_file_range_write

MIB = 1024 * 1024


def test_write_back_starts_every_window(tmp_path):
    assert writeback._SYNC_FILE_RANGE is not None, 'glibc has sync_file_range on every Linux this runs on'
    path = str(tmp_path / 'disk.img')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        behind = WriteBehind(fd, window=8 * MIB)
        chunk = b'\x5a' * MIB
        for i in range(40):
            os.pwrite(fd, chunk, i * MIB)
            behind.wrote(i * MIB, MIB)
        assert behind.kicks == 5 and behind.enabled
        behind.kick()
        assert behind.kicks == 5, 'nothing written since the last kick: nothing to start'
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.path.getsize(path) == 40 * MIB


def test_disabled_write_behind_does_nothing(tmp_path):
    fd = os.open(str(tmp_path / 'f'), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        behind = WriteBehind(fd, window=MIB, enabled=False)
        behind.wrote(0, 10 * MIB)
        assert behind.kicks == 0
    finally:
        os.close(fd)


def test_a_pipe_turns_it_off_instead_of_failing():
    read_end, write_end = os.pipe()
    try:
        assert sync_file_range_write(write_end, 0, 4096) is False
        behind = WriteBehind(write_end, window=1)
        os.write(write_end, b'x')
        behind.wrote(0, 1)
        assert behind.enabled is False and behind.kicks == 0
    finally:
        os.close(read_end)
        os.close(write_end)
