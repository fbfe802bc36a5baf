# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""In-use detection against real processes: a real qemu-system-x86_64 with
the disk open (paused, TCG, no display), plain Python processes holding OFD
locks or descriptors, and what is left after they die."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu import image_locks as qemu_locks
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import ImageInUseError
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.image_locks import (
    describe_holders, describe_locks, disk_holders, ensure_not_in_use, is_in_use, is_locked, locked_bytes,
)

from support.qemu_process import QEMU, start_qemu, stop_qemu

needs_qemu = pytest.mark.skipif(QEMU is None, reason='needs qemu-system-x86_64')
needs_linux = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='OFD locks and /proc are Linux')
pytestmark = needs_linux

MIB = 1024 * 1024


@pytest.fixture
def disk(tmp_path):
    path = str(tmp_path / 'disk.img')
    with open(path, 'wb') as f:
        f.truncate(64 * MIB)
    return path


_LOCKER = r'''
import fcntl, os, struct, sys, time
path, mode, start, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fd = os.open(path, os.O_RDWR if mode == 'rw' else os.O_RDONLY)
if length:
    flock = struct.pack('hhqqi', fcntl.F_RDLCK, 0, start, length, 0) + bytes(36)
    fcntl.fcntl(fd, 37, flock)  # F_OFD_SETLK
print('ready', flush=True)
time.sleep(120)
'''


def start_holder(path, mode='ro', start=0, length=0):
    """A Python process holding ``path`` open (read-only or read-write) and,
    with ``length``, an OFD read lock on [start, start+length)."""
    proc = subprocess.Popen([sys.executable, '-c', _LOCKER, path, mode, str(start), str(length)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout.readline().strip() == b'ready'
    return proc


def stop_holder(proc):
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_unused_and_missing_files(disk, tmp_path):
    assert is_locked(disk) is False
    assert locked_bytes(disk) == []
    assert disk_holders(disk) == []
    assert is_in_use(disk) is False
    ensure_not_in_use([disk], 'pack it')  # no exception
    missing = str(tmp_path / 'missing.img')
    assert is_in_use(missing) is False and disk_holders(missing) == [] and locked_bytes(missing) == []


def test_fifo_and_directory_are_never_in_use_and_do_not_hang(tmp_path):
    fifo = str(tmp_path / 'fifo')
    os.mkfifo(fifo)
    assert is_in_use(fifo) is False
    assert is_in_use(str(tmp_path)) is False


@needs_qemu
def test_qemu_with_the_disk_open_is_detected_and_named(disk):
    proc = start_qemu(disk)
    try:
        assert is_locked(disk) and is_in_use(disk)
        found = locked_bytes(disk)
        assert (100, 'read') in found
        assert 'consistent read' in describe_locks(found)
        holders = disk_holders(disk)
        assert [h['pid'] for h in holders] == [proc.pid]
        assert holders[0]['command'].startswith('qemu-system')
        assert holders[0]['locks'] and 'OFDLCK' in holders[0]['locks'][0]
        with pytest.raises(ImageInUseError) as info:
            ensure_not_in_use([disk], 'pack /x')
        message = str(info.value)
        assert 'cannot pack /x' in message and 'pid %d' % proc.pid in message and 'qemu-system' in message
        assert 'stop the VM' in message and info.value.kind == 'in_use'
        assert [h['pid'] for h in info.value.holders] == [proc.pid]
        assert 'pid %d (qemu-system' % proc.pid in describe_holders(holders)
    finally:
        stop_qemu(proc)
    # The kernel drops QEMU's locks with the process: nothing stale remains.
    assert not is_in_use(disk) and disk_holders(disk) == []


@needs_qemu
def test_qemu_guest_device_holds_and_denies_write(disk):
    proc = start_qemu(disk, attach=True)
    try:
        found = dict(locked_bytes(disk))
        assert 100 in found and 101 in found  # consistent read + write held
        assert 201 in found  # others may not write
        text = describe_locks(sorted(found.items()))
        assert 'uses consistent read, write' in text and "refuses others' write" in text
        holders = disk_holders(disk)
        assert len(holders) == 1 and holders[0]['pid'] == proc.pid and holders[0]['writable'] is True
        assert 'open for writing' in describe_holders(holders)
    finally:
        stop_qemu(proc, signal.SIGTERM)
    assert not is_in_use(disk)


@needs_qemu
def test_qemu_on_an_overlay_locks_the_backing_disk(tmp_path, disk):
    overlay = str(tmp_path / 'layer.qcow2')
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', 'disk.img', overlay],
                   check=True, cwd=str(tmp_path))
    proc = start_qemu(overlay, fmt='qcow2')
    try:
        deadline = time.monotonic() + 10
        while not is_locked(disk) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert is_in_use(disk) and is_in_use(overlay)
        assert [h['pid'] for h in disk_holders(disk)] == [proc.pid]
    finally:
        stop_qemu(proc)
    assert not is_in_use(disk) and not is_in_use(overlay)


@needs_qemu
def test_detected_through_another_name_of_the_same_file(tmp_path, disk):
    link = str(tmp_path / 'hardlink.img')
    os.link(disk, link)
    symlink = str(tmp_path / 'symlink.img')
    os.symlink(disk, symlink)
    proc = start_qemu(link)
    try:
        assert is_in_use(disk) and is_in_use(symlink)
        assert [h['pid'] for h in disk_holders(symlink)] == [proc.pid]
    finally:
        stop_qemu(proc)


@needs_qemu
def test_read_only_qemu_still_counts(disk):
    proc = start_qemu(disk, readonly=True)
    try:
        assert is_in_use(disk)
        assert disk_holders(disk)[0]['writable'] is False
    finally:
        stop_qemu(proc)


def test_any_ofd_lock_in_qemus_range_counts_and_outside_does_not(disk):
    outside = start_holder(disk, start=0, length=50)
    try:
        assert not is_locked(disk) and not is_in_use(disk)
        assert disk_holders(disk) == []
        assert [h['pid'] for h in disk_holders(disk, include_readers=True)] == [outside.pid]
    finally:
        stop_holder(outside)
    inside = start_holder(disk, start=250, length=1)
    try:
        assert locked_bytes(disk) == [(250, 'read')]
        assert 'locks byte(s) 250' in describe_locks(locked_bytes(disk))
        assert is_in_use(disk)
        holders = disk_holders(disk)
        assert [h['pid'] for h in holders] == [inside.pid] and holders[0]['command'].startswith('python')
    finally:
        stop_holder(inside)
    assert not is_in_use(disk)


def test_open_for_writing_counts_open_for_reading_does_not(disk):
    reader = start_holder(disk, mode='ro')
    try:
        assert not is_in_use(disk)
    finally:
        stop_holder(reader)
    writer = start_holder(disk, mode='rw')
    try:
        assert not is_locked(disk)
        assert is_in_use(disk)
        holders = disk_holders(disk)
        assert [h['pid'] for h in holders] == [writer.pid] and holders[0]['writable'] is True
        with pytest.raises(ImageInUseError) as info:
            ensure_not_in_use([disk], 'remove it')
        assert 'pid %d' % writer.pid in str(info.value) and 'QEMU image lock' not in str(info.value)
    finally:
        stop_holder(writer)


def test_whole_file_flock_is_not_an_image_lock(disk):
    fd = os.open(disk, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert not is_in_use(disk)
    finally:
        os.close(fd)


def test_probe_leaves_no_descriptor_and_holds_nothing(disk):
    before = set(os.listdir('/proc/self/fd'))
    for _i in range(20):
        is_in_use(disk)
        locked_bytes(disk)
    assert set(os.listdir('/proc/self/fd')) <= before | {str(max(int(f) for f in before) + 1)}
    # The probe tests (F_OFD_GETLK); it never takes a lock another process would see.
    other = start_holder(disk, mode='rw')
    try:
        assert is_in_use(disk)
    finally:
        stop_holder(other)


def test_invisible_holder_is_reported_without_a_pid(disk, monkeypatch):
    locker = start_holder(disk, start=100, length=1)
    try:
        # As if the locking process belonged to another user (no /proc access).
        monkeypatch.setattr(qemu_locks, '_open_descriptors', lambda inodes: dict((inode, []) for inode in inodes))
        with pytest.raises(ImageInUseError) as info:
            ensure_not_in_use([disk], 'pack it')
        assert 'a process this user cannot see' in str(info.value)
        assert 'uses consistent read' in str(info.value)
    finally:
        stop_holder(locker)


def test_command_names_the_program_without_its_arguments(disk):
    holder = start_holder(disk, mode='rw')
    try:
        (entry,) = disk_holders(disk)
        assert entry['command'] == os.path.basename(sys.executable)
        assert _LOCKER.strip().splitlines()[0] not in entry['command']
    finally:
        stop_holder(holder)


def test_many_disks_cost_one_pass_over_proc(tmp_path, monkeypatch):
    disks = []
    for i in range(5):
        path = tmp_path / ('d%d.img' % i)
        path.write_bytes(b'\0' * 4096)
        disks.append(str(path))
    holder = start_holder(disks[3], mode='rw')
    try:
        listings = []
        real_listdir = os.listdir

        def counting_listdir(path):
            if path == '/proc':
                listings.append(path)
            return real_listdir(path)
        monkeypatch.setattr(os, 'listdir', counting_listdir)
        found = qemu_locks.disk_holders_of(disks)
        monkeypatch.undo()
        assert len(listings) == 1, 'one walk of /proc for all the disks'
        assert [len(found[d]) for d in disks] == [0, 0, 0, 1, 0]
        assert found[disks[3]] == disk_holders(disks[3])
    finally:
        stop_holder(holder)
