# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vm_image_package through ansible-playbook, with the real parts: a blank
image written at scattered offsets, packed, fetched by vm_image_fetch into a
store, and read back through a qcow2 overlay by qemu-img and qemu-io; GNU tar
+ zstd extracting the archive; a real QEMU holding the disk; a full or
read-only destination file system."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.qemu_img import create_overlay
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.image_locks import QEMU_PERM_BASE, locked_bytes

from support.ansible_run import run_playbook
from support.image_factory import data_extents_of, extract_with_gnu_tar, pattern, same_sparse_content
from support.mounts import mounted_tmpfs
from support.mutable_crash import kill_mid

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ('tar', 'zstd', 'qemu-img', 'qemu-io')),
    reason='needs GNU tar, zstd, qemu-img and qemu-io')

QEMU = shutil.which('qemu-system-x86_64')
MIB = 1024 * 1024
GIB = 1024 * MIB
# (offset, length, byte) written into the disk: start, unaligned middle, near the end.
WRITES = ((0, 4096, 0x11), (5 * MIB + 123, 70000, 0x5a), (300 * MIB, MIB, 0xc3), (GIB - 512, 512, 0x7e))


def _package(**args):
    return {'vmimage.qemu.vm_image_package': args, 'register': 'r'}


def _write_disk(disk, writes=WRITES):
    fd = os.open(disk, os.O_WRONLY)
    try:
        for offset, length, byte in writes:
            os.pwrite(fd, bytes([byte]) * length, offset)
        os.pwrite(fd, pattern(20000, 3), 700 * MIB)
    finally:
        os.close(fd)
    time.sleep(0.05)  # past the timestamp granularity, so the first pack is trusted


def _sha256(path):
    with open(path, 'rb') as f:
        return 'sha256:' + hashlib.sha256(f.read()).hexdigest()


def test_round_trip_blank_pack_fetch_read_back(tmp_path):
    path = str(tmp_path / 'build')
    dest = str(tmp_path / 'out' / 'image.tar.zst')
    os.makedirs(os.path.dirname(dest))
    store = str(tmp_path / 'store')

    created = run_playbook([
        _package(path=path, size_gib=1, machine={'memory': 256, 'network': 'rtl8139'}),
        _package(path=path, size_gib=1, machine={'memory': 256, 'network': 'rtl8139'}),
    ], tmp_path, diff=True)
    first, again = created
    assert first['changed'] is True and first['created'] is True and again['changed'] is False
    assert first['path'] == path and first['disk'] == os.path.join(path, 'disk.img')
    assert first['format'] == 'raw' and first['disk_size'] == GIB
    assert first['machine']['memory'] == 256 and first['machine']['graphics'] == 'qxl-vga'
    assert 'uuid' not in first['machine'] and 'mac' not in first['machine']
    assert first['state'] == 'directory', 'Ansible adds the folder attributes'
    assert first['diff']['before']['state'] == 'absent' and first['diff']['after']['disk_size'] == GIB

    _write_disk(first['disk'])
    packed = run_playbook([
        dict(_package(path=path, dest=dest), register='packed'),
        _package(path=path, dest=dest),
        {'vmimage.qemu.vm_image_fetch': {'url': dest, 'checksum': '{{ packed.digest }}', 'image_id': 'built',
                                         'store': store},
         'register': 'fetched'},
    ], tmp_path)
    pack, repack, fetched = packed
    assert pack['changed'] is True and pack['packed'] is True
    assert pack['dest'] == dest and pack['digest'] == _sha256(dest)
    assert pack['archive_size'] == os.path.getsize(dest) and pack['virtual_size'] == GIB
    assert pack['data_size'] == sum(n for _offset, n in data_extents_of(os.path.join(path, 'disk.img')))
    assert pack['machine']['network'] == 'rtl8139'
    assert repack['changed'] is False and repack['packed'] is False and repack['digest'] == pack['digest']
    assert sorted(os.listdir(os.path.dirname(dest))) == ['image.tar.zst', 'image.tar.zst.vmimage.json']
    assert sorted(os.listdir(path)) == ['disk.img', 'machine.json']
    assert fetched['changed'] is True and fetched['digest'] == pack['digest']

    # An instance: a qcow2 overlay of the fetched image's layer, read back by QEMU's tools.
    instance = str(tmp_path / 'instance.qcow2')
    create_overlay(instance, fetched['layer'], 'qcow2')
    for offset, length, byte in WRITES:
        proc = subprocess.run(['qemu-io', '-f', 'qcow2', '-r', '-c',
                               'read -P 0x%02x %d %d' % (byte, offset, length), instance],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, check=False)
        assert proc.returncode == 0 and 'Pattern verification failed' not in proc.stdout, proc.stdout
    proc = subprocess.run(['qemu-io', '-f', 'qcow2', '-r', '-c', 'read -P 0x00 %d %d' % (200 * MIB, MIB),
                           instance], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout
    assert 'Pattern verification failed' not in proc.stdout, 'holes read back as zeros'
    raw = str(tmp_path / 'instance.raw')
    subprocess.run(['qemu-img', 'convert', '-f', 'qcow2', '-O', 'raw', instance, raw], check=True)
    assert same_sparse_content(raw, os.path.join(path, 'disk.img'))

    # The original tools read it too: zstd + GNU tar give identical sparse files.
    extracted = extract_with_gnu_tar(dest, str(tmp_path / 'gnu'))
    assert same_sparse_content(os.path.join(extracted, 'disk.img'), os.path.join(path, 'disk.img'))
    assert os.stat(os.path.join(extracted, 'disk.img')).st_blocks * 512 < 8 * MIB
    with open(os.path.join(extracted, 'machine.json'), 'rb') as a, \
            open(os.path.join(path, 'machine.json'), 'rb') as b:
        assert a.read() == b.read()
    info = json.loads(subprocess.run(['qemu-img', 'info', '--output', 'json', '-f', 'qcow2',
                                      os.path.join(extracted, 'layer.qcow2')],
                                     check=True, stdout=subprocess.PIPE).stdout)
    assert info['backing-filename'] == 'disk.img' and info['backing-filename-format'] == 'raw'


def test_from_archive_check_mode_diff_and_absent(tmp_path):
    src = str(tmp_path / 'src')
    archive = str(tmp_path / 'base.tar.zst')
    path = str(tmp_path / 'work')
    dest = str(tmp_path / 'new.tar.zst')
    base = run_playbook([_package(path=src, size_gib=1)], tmp_path)
    _write_disk(base[0]['disk'])
    run_playbook([_package(path=src, dest=archive)], tmp_path)

    check = run_playbook([
        _package(path=path, from_archive=archive, dest=dest),
        _package(path=path, state='absent'),
    ], tmp_path, check=True, diff=True)
    assert check[0]['changed'] is True and check[0]['created'] is True and check[0]['packed'] is False
    assert check[1]['changed'] is False
    assert not os.path.exists(path) and not os.path.exists(dest), 'check mode writes nothing'

    run = run_playbook([
        _package(path=path, from_archive=archive),
        _package(path=path, dest=dest),
    ], tmp_path)
    assert run[0]['changed'] is True and run[0]['created'] is True
    assert sorted(os.listdir(path)) == ['disk.img', 'machine.json'], 'layer.qcow2 dropped'
    assert run[1]['digest'] == _sha256(archive), 'unmodified: the same archive'

    fd = os.open(os.path.join(path, 'disk.img'), os.O_WRONLY)
    os.pwrite(fd, b'update', 9 * MIB)
    os.close(fd)
    time.sleep(0.05)
    check = run_playbook([_package(path=path, dest=dest)], tmp_path, check=True, diff=True)
    assert check[0]['changed'] is True and check[0]['packed'] is False
    assert 'disk' in check[0]['pack_reason']
    assert check[0]['diff']['before']['dest_digest'] == run[1]['digest']
    run2 = run_playbook([
        _package(path=path, dest=dest),
        _package(path=path, dest=dest),
        _package(path=path, state='absent'),
        _package(path=path, state='absent'),
    ], tmp_path, check=False, diff=True)
    assert run2[0]['changed'] is True and run2[0]['digest'] != run[1]['digest']
    assert run2[0]['previous_digest'] == run[1]['digest']
    assert run2[0]['diff']['after']['dest_digest'] == run2[0]['digest']
    assert run2[1]['changed'] is False
    assert run2[2]['changed'] is True and run2[2]['removed'] is True and not os.path.exists(path)
    assert run2[3]['changed'] is False
    assert sorted(os.listdir(str(tmp_path))).count('work') == 0


def test_option_errors(tmp_path):
    path = str(tmp_path / 'img')
    run = run_playbook([
        dict(_package(path=path), ignore_errors=True),
        dict(_package(path=path, size_gib=100), ignore_errors=True),
        dict(_package(path=path, size_gib=1, machine={'network': 'virtio'}), ignore_errors=True),
        dict(_package(path=path, size_gib=1, dest=str(tmp_path / 'a.tar.zst'), compression_level=20),
             ignore_errors=True),
        dict(_package(path=path, size_gib=1, from_archive='/nonexistent'), ignore_errors=True),
        dict(_package(path=path, size_gib=1, max_size_gib=0), ignore_errors=True),
        dict(_package(path=path, state='absent', dest=str(tmp_path / 'a.tar.zst')), ignore_errors=True),
    ], tmp_path, expect_failure=True)
    missing, too_big, bad_machine, bad_level, exclusive, bad_max, absent_dest = run
    assert missing['failed'] and 'size_gib' in missing['msg'] and missing['error_kind'] == 'not_found'
    assert too_big['failed'] and too_big['error_kind'] == 'limit_exceeded' and '80 GiB' in too_big['msg']
    assert bad_machine['failed'] and bad_machine['error_kind'] == 'invalid_machine' and 'network' in bad_machine['msg']
    assert bad_level['failed'] and bad_level['error_kind'] == 'invalid_option'
    assert bad_level['msg'] == 'compression_level must be between 1 and 19, got 20'
    assert exclusive['failed'] and 'mutually exclusive' in exclusive['msg']
    assert bad_max['failed'] and bad_max['error_kind'] == 'invalid_option'
    assert bad_max['msg'] == 'max_size_gib must be a whole number of GiB, at least 1, got 0'
    assert absent_dest['failed'] and absent_dest['error_kind'] == 'invalid_option'
    assert absent_dest['msg'].startswith('dest is only used with state=present')
    assert os.listdir(str(tmp_path)).count('img') == 0


@pytest.mark.skipif(QEMU is None, reason='needs qemu-system-x86_64')
def test_running_qemu_blocks_pack_and_absent(tmp_path):
    path = str(tmp_path / 'img')
    dest = str(tmp_path / 'img.tar.zst')
    run_playbook([_package(path=path, size_gib=1)], tmp_path)
    disk = os.path.join(path, 'disk.img')
    proc = subprocess.Popen([QEMU, '-machine', 'pc', '-m', '16', '-nodefaults', '-nographic', '-display', 'none',
                             '-accel', 'tcg', '-S', '-monitor', 'none', '-serial', 'none',
                             '-drive', 'file=%s,format=raw,if=none,id=d0' % disk,
                             '-device', 'virtio-blk-pci,drive=d0'],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not any(o == QEMU_PERM_BASE + 1 for o, _kind in locked_bytes(disk)):
            assert proc.poll() is None and time.monotonic() < deadline, 'qemu did not lock the disk'
            time.sleep(0.02)
        run = run_playbook([
            dict(_package(path=path, dest=dest), ignore_errors=True),
            dict(_package(path=path, state='absent', force=True), ignore_errors=True),
        ], tmp_path, expect_failure=True)
        for result in run:
            assert result['failed'] is True and result['error_kind'] == 'in_use'
            assert 'pid %d (qemu-system' % proc.pid in result['msg'] and 'stop the VM' in result['msg']
            assert [h['pid'] for h in result['holders']] == [proc.pid]
            assert result['holders'][0]['writable'] is True
        assert sorted(os.listdir(path)) == ['disk.img', 'machine.json']
        assert not os.path.exists(dest)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run = run_playbook([_package(path=path, dest=dest), _package(path=path, state='absent')], tmp_path)
    assert run[0]['changed'] is True and run[1]['changed'] is True and not os.path.exists(path)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which('mount'), reason='mounting a tmpfs needs root')
def test_full_and_read_only_destinations_fail_clearly_and_leave_nothing(tmp_path):
    path = str(tmp_path / 'img')
    run_playbook([_package(path=path, size_gib=1)], tmp_path)
    fd = os.open(os.path.join(path, 'disk.img'), os.O_WRONLY)
    for i in range(4):
        os.pwrite(fd, os.urandom(MIB), i * 100 * MIB)
    os.close(fd)
    with mounted_tmpfs(str(tmp_path / 'full'), 'size=1m') as full, mounted_tmpfs(str(tmp_path / 'ro'), 'ro,size=1m') as ro:
        run = run_playbook([
            dict(_package(path=path, dest=os.path.join(full, 'img.tar.zst')), ignore_errors=True),
            dict(_package(path=path, dest=os.path.join(ro, 'img.tar.zst')), ignore_errors=True),
        ], tmp_path, expect_failure=True)
        assert run[0]['failed'] and 'no space left on device' in run[0]['msg'], run[0]['msg']
        assert run[1]['failed'] and 'read-only file system' in run[1]['msg'], run[1]['msg']
        assert os.listdir(full) == [] and os.listdir(ro) == []
    assert sorted(os.listdir(path)) == ['disk.img', 'machine.json']


def test_sigkill_mid_pack_create_and_absent_then_the_next_run_cleans_up(tmp_path):
    """A pack, a blank create, a create from an archive and a removal, each
    killed with SIGKILL in the middle (by a library process, as the module
    runs it), leave debris; check mode leaves it alone, and the next real
    run of the module removes all of it and succeeds, leaving only the
    user's files and the results."""
    work = str(tmp_path / 'work')
    os.mkdir(work)
    spaces = {}
    for name in ('pack', 'blank', 'restored', 'gone'):
        spaces[name] = str(tmp_path / name)
        os.mkdir(spaces[name])
        with open(os.path.join(spaces[name], 'notes.txt'), 'w') as f:
            f.write("the user's own file")
    packed, out = os.path.join(spaces['pack'], 'img'), os.path.join(spaces['pack'], 'img.tar.zst')
    blank, restored, gone = (os.path.join(spaces[n], 'img') for n in ('blank', 'restored', 'gone'))
    base = str(tmp_path / 'base.tar.zst')
    run_playbook([_package(path=packed, size_gib=1), _package(path=gone, size_gib=1)], tmp_path)
    _write_disk(os.path.join(packed, 'disk.img'), writes=WRITES[:2])
    run_playbook([_package(path=packed, dest=base)], tmp_path)
    _write_disk(os.path.join(packed, 'disk.img'), writes=WRITES[2:])

    kill_mid('pack', packed, out, work)
    kill_mid('create', blank, None, work)
    kill_mid('from_archive', restored, base, work)
    kill_mid('dispose', gone, None, work)
    assert not any(os.path.exists(p) for p in (out, blank, restored)), 'nothing half made is visible'
    assert not os.path.exists(gone), 'the killed removal made the image vanish at once'
    debris = dict((name, sorted(os.listdir(folder))) for name, folder in spaces.items())
    for name, names in debris.items():
        assert len(names) > (2 if name == 'pack' else 1), 'the killed %s left something to clean up' % name

    tasks = [
        _package(path=packed, dest=out),
        _package(path=blank, size_gib=1),
        _package(path=restored, from_archive=base),
        _package(path=gone, state='absent'),
    ]
    check = run_playbook(tasks, tmp_path, check=True)
    assert [r['changed'] for r in check] == [True, True, True, False]
    assert dict((n, sorted(os.listdir(f))) for n, f in spaces.items()) == debris, 'check mode removes nothing'

    run = run_playbook(tasks, tmp_path)
    assert run[0]['changed'] is True and run[0]['packed'] is True and run[0]['digest'] == _sha256(out)
    assert run[1]['created'] is True and run[2]['created'] is True
    assert run[3]['changed'] is False and run[3]['removed'] is False
    assert sorted(os.listdir(spaces['pack'])) == ['img', 'img.tar.zst', 'img.tar.zst.vmimage.json', 'notes.txt']
    for name in ('blank', 'restored'):
        assert sorted(os.listdir(spaces[name])) == ['img', 'notes.txt'], name
    assert os.listdir(spaces['gone']) == ['notes.txt']
    for path in (packed, blank, restored):
        assert sorted(os.listdir(path)) == ['disk.img', 'machine.json'], path
