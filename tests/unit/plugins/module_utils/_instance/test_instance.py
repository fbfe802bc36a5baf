# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Copy-on-write instances with real parts: an image fetched over loopback
HTTP, overlays made by qemu-img, VMs booted by qemu-system-x86_64 (KVM when
usable, TCG otherwise), locks taken by a live QEMU, processes killed with
SIGKILL in the middle of a creation."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from support.boot_image import (
    BOOT_MACHINE, debug_exit_args, expected_exit_status, make_boot_image_folder, parse_boot_lines,
)
from support.http_server import LocalHTTPServer

from ansible_collections.vmimage.qemu.plugins.module_utils._instance import instance as instance_mod
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    ImageInUseError, InvalidMachineError, NotFoundError, QemuImgError, StoreError,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._instance.instance import InstanceManager
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.machine import is_valid_mac, is_valid_uuid
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.accelerator import decide_accelerator
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.qemu_img import qemu_img_info
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.image_locks import is_in_use
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore

COLLECTIONS = os.environ.get('ANSIBLE_COLLECTIONS_PATH', '')
IMAGE_MAC = BOOT_MACHINE['mac']


def _archive(folder):
    out = io.BytesIO()
    result = write_image_archive(folder, out)
    return out.getvalue(), result.digest


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    """Two bootable images on a loopback HTTP server: 'boot' (16 MiB) and
    'boot2' (another marker, so another digest)."""
    tmp = tmp_path_factory.mktemp('images')
    boot, boot_digest = _archive(make_boot_image_folder(str(tmp / 'boot')))
    other, other_digest = _archive(make_boot_image_folder(str(tmp / 'boot2'), marker='VMIMAGE-BOOT-TWO'))
    with LocalHTTPServer() as srv:
        yield {'boot': (srv.add('/boot/image.tar.zst', boot), boot_digest),
               'boot2': (srv.add('/boot2/image.tar.zst', other), other_digest)}


@pytest.fixture
def store(tmp_path, served):
    store = ImageStore(str(tmp_path / 'store'))
    url, digest = served['boot']
    assert fetch_image(store, url, alias='boot').digest == digest
    return store


@pytest.fixture
def manager(store):
    return InstanceManager(store)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def _image_state(store, digest):
    """Content hash, mtime and mode of every cached file of the image."""
    folder = store.image_path(digest)
    state = {}
    for name in ('disk.img', 'layer.qcow2', 'machine.json'):
        st = os.stat(os.path.join(folder, name))
        state[name] = (_sha256(os.path.join(folder, name)), st.st_mtime_ns, st.st_mode & 0o777)
    return state


def _work_folders(store):
    return sorted(n for n in os.listdir(store.instances_dir) if n.startswith('.'))


def _boot(manager, name, tmp_path, accel='auto', tag=''):
    """Start the instance from its qemu_args; return the Popen and serial log path."""
    log = str(tmp_path / ('serial-%s%s.log' % (name, tag)))
    argv = manager.qemu_args(manager.get(name), accel=accel) + debug_exit_args() + ['-serial', 'file:' + log]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, log


def _finish(proc, log, timeout=60):
    try:
        _out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError('the VM did not exit within %d s' % timeout)
    assert proc.returncode == expected_exit_status(), err.decode('utf-8', 'replace')
    with open(log) as f:
        return parse_boot_lines(f.read())


# ---------------------------------------------------------------- booting

def test_two_instances_boot_and_write_only_their_own_overlay(store, manager, tmp_path):
    digest = store.resolve('boot')
    before = _image_state(store, digest)
    a = manager.ensure_present('a', 'boot').after
    b = manager.ensure_present('b', 'boot').after

    # The chain, as qemu-img sees it, with every format explicit.
    chain = qemu_img_info(manager.disk_path('a'), 'qcow2', backing_chain=True)
    layer = os.path.join(store.image_path(digest), 'layer.qcow2')
    assert [(e['filename'], e['format']) for e in chain] == [
        (manager.disk_path('a'), 'qcow2'), (layer, 'qcow2'),
        (os.path.join(store.image_path(digest), 'disk.img'), 'raw')]
    assert chain[0]['backing-filename'] == layer and chain[0]['backing-filename-format'] == 'qcow2'
    assert chain[1]['backing-filename'] == 'disk.img' and chain[1]['backing-filename-format'] == 'raw'
    assert manager.backing_chain('a') == manager.expected_chain('a', digest)

    # Both at once (shared read-only backing files), with KVM when usable.
    argv = manager.qemu_args(a)
    assert argv[argv.index('-accel') + 1] == decide_accelerator('auto').accel
    assert 'e1000,netdev=net0,mac=%s' % a['mac'] in argv
    runs = [_boot(manager, 'a', tmp_path, tag='1'), _boot(manager, 'b', tmp_path, tag='1')]
    assert [_finish(*run) for run in runs] == [[1], [1]]
    # The guest wrote its boot counter to its disk; a second boot of A sees it ...
    assert _finish(*_boot(manager, 'a', tmp_path, tag='2')) == [2]
    # ... and B does not (booted with TCG here, to prove that path too).
    assert _finish(*_boot(manager, 'b', tmp_path, accel='tcg', tag='2')) == [2]
    assert _finish(*_boot(manager, 'a', tmp_path, accel='tcg', tag='3')) == [3]

    # A write from the test itself lands in A's overlay only.
    subprocess.run(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0xa5 1M 64k', manager.disk_path('a')],
                   check=True, stdout=subprocess.PIPE)
    read = ['qemu-io', '-r', '-U', '-f', 'qcow2', '-c', 'read -P %s 1M 64k']
    assert b'Pattern verification failed' not in subprocess.run(
        read[:-1] + [read[-1] % '0xa5', manager.disk_path('a')], stdout=subprocess.PIPE, check=True).stdout
    assert b'Pattern verification failed' not in subprocess.run(
        read[:-1] + [read[-1] % '0', manager.disk_path('b')], stdout=subprocess.PIPE, check=True).stdout
    assert b'Pattern verification failed' not in subprocess.run(
        read[:-1] + [read[-1] % '0', layer], stdout=subprocess.PIPE, check=True).stdout

    # The cached image: not one byte, timestamp or permission changed.
    assert _image_state(store, digest) == before
    assert all(mode & 0o222 == 0 for _sha, _mtime, mode in before.values())
    assert a['mac'] != b['mac']


# ---------------------------------------------------------------- identity & machine

def test_each_instance_has_its_own_persisted_mac_and_uuid(store, manager):
    a = manager.ensure_present('a', 'boot').after
    b = manager.ensure_present('b', 'boot').after
    for rec in (a, b):
        assert is_valid_mac(rec['mac']) and is_valid_uuid(rec['uuid'])
        assert rec['mac'] != IMAGE_MAC, "an instance never gets the image's default MAC"
        assert rec['machine']['mac'] == rec['mac'] and rec['machine']['uuid'] == rec['uuid']
        octet = int(rec['mac'][:2], 16)
        assert octet & 0x02 and not octet & 0x01, 'locally administered, unicast'
    assert a['mac'] != b['mac'] and a['uuid'] != b['uuid']
    # Persisted at exactly the path the store reads references from.
    on_disk = json.load(open(os.path.join(store.instances_dir, 'a', 'instance.json')))
    assert {k: on_disk[k] for k in ('name', 'digest', 'mac', 'uuid')} == \
        {'name': 'a', 'digest': store.resolve('boot'), 'mac': a['mac'], 'uuid': a['uuid']}
    # Idempotent: the second run changes nothing and keeps the identity.
    again = manager.ensure_present('a', 'boot')
    assert again.action == 'none' and again.after['mac'] == a['mac'] and again.after['uuid'] == a['uuid']
    assert manager.ensure_present('a', store.resolve('boot')).action == 'none', 'a digest names the same image'

    with pytest.raises(InvalidMachineError, match="image's default MAC"):
        manager.ensure_present('c', 'boot', mac=IMAGE_MAC)
    with pytest.raises(InvalidMachineError, match='already the MAC of instance a'):
        manager.ensure_present('c', 'boot', mac=a['mac'])
    with pytest.raises(InvalidMachineError, match='mac'):
        manager.ensure_present('c', 'boot', mac='01:00:5e:00:00:01')
    assert manager.get('c') is None and _work_folders(store) == []


def test_machine_overrides_are_merged_validated_and_updated_in_place(store, manager):
    created = manager.ensure_present('a', 'boot', machine={'memory': 64, 'tablet': None}).after
    assert created['machine']['memory'] == 64
    assert created['machine']['tablet'] == 'usb-tablet', 'a null override falls back to the default'
    assert created['machine']['graphics'] == BOOT_MACHINE['graphics'], 'the rest comes from machine.json'
    inode = os.stat(manager.disk_path('a')).st_ino

    assert manager.ensure_present('a', 'boot').action == 'none', 'omitted overrides are kept'
    updated = manager.ensure_present('a', 'boot', machine={'memory': 128}, mac='02:aa:bb:cc:dd:ee')
    assert updated.action == 'update'
    assert updated.after['machine']['memory'] == 128 and updated.after['mac'] == '02:aa:bb:cc:dd:ee'
    assert updated.after['uuid'] == created['uuid']
    assert os.stat(manager.disk_path('a')).st_ino == inode, 'an update never touches the disk'
    assert manager.get('a')['machine']['mac'] == '02:aa:bb:cc:dd:ee'

    uuid = '0b3e4d3c-1d2e-4f60-8a7b-9c0d1e2f3a4b'
    assert manager.ensure_present('b', 'boot', machine={'uuid': uuid}).after['uuid'] == uuid

    for bad in ({'memory': 0}, {'bogus': 1}, {'version': 2}, {'network': 'virtio-net'}, {'uuid': 'x'}):
        with pytest.raises(InvalidMachineError):
            manager.ensure_present('c', 'boot', machine=bad)
    with pytest.raises(InvalidMachineError, match='differ'):
        manager.ensure_present('c', 'boot', mac='02:00:00:00:00:02', machine={'mac': '02:00:00:00:00:03'})
    assert manager.get('c') is None and _work_folders(store) == []


@pytest.mark.parametrize('name', ['', '.new-a', '..', 'a/b', '-a', 'x' * 65, 'a b', 'é'])
def test_invalid_names_are_refused(manager, name):
    with pytest.raises(StoreError, match='invalid instance name'):
        manager.ensure_present(name, 'boot')


def test_unknown_image_is_not_found(manager):
    with pytest.raises(NotFoundError):
        manager.ensure_present('a', 'nope')
    with pytest.raises(NotFoundError):
        manager.ensure_present('a', 'sha256:' + '0' * 64)


def test_check_mode_writes_nothing(store, manager):
    listing = os.listdir(store.instances_dir)
    plan = manager.ensure_present('a', 'boot', check_mode=True)
    assert plan.action == 'create' and plan.after['mac'] is None and plan.after['digest'] == store.resolve('boot')
    assert os.listdir(store.instances_dir) == listing
    manager.ensure_present('a', 'boot')
    assert manager.ensure_present('a', 'boot', check_mode=True).action == 'none'
    assert manager.ensure_present('a', 'boot', machine={'memory': 99}, check_mode=True).action == 'update'
    assert manager.get('a')['machine']['memory'] == BOOT_MACHINE['memory']
    assert manager.remove('a', check_mode=True).action == 'remove'
    assert manager.get('a') is not None


# ---------------------------------------------------------------- cost

def test_200_instances_cost_only_their_overlays(tmp_path, served):
    # A big (1 GiB apparent) image: the overlays must not grow with it.
    folder = make_boot_image_folder(str(tmp_path / 'big'), disk_size=1024 ** 3)
    data, digest = _archive(folder)
    store = ImageStore(str(tmp_path / 'store'))
    with LocalHTTPServer() as srv:
        fetch_image(store, srv.add('/big.tar.zst', data), alias='big')
    manager = InstanceManager(store)

    def allocated(root):
        total = 0
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
        return total

    image_before = store.image_allocated(digest)
    store_before = allocated(store.root)
    started = time.monotonic()
    macs = set()
    for i in range(200):
        macs.add(manager.ensure_present('vm%03d' % i, 'big').after['mac'])
    elapsed = time.monotonic() - started
    assert len(macs) == 200
    overlays = [manager.disk_path('vm%03d' % i) for i in range(200)]
    per_overlay = max(os.stat(p).st_blocks * 512 for p in overlays)
    assert per_overlay <= 512 * 1024, 'an empty overlay is a few hundred KiB at most, whatever the image'
    instances_cost = allocated(store.instances_dir)
    refs_cost = allocated(store.refs_dir)
    assert store.image_allocated(digest) == image_before, 'the image is never copied'
    # Everything the store grew by is the instances' own folders (overlay +
    # record each) and their reference records (one small file each).
    grown = allocated(store.root) - store_before
    assert refs_cost <= 200 * 8 * 1024
    assert grown <= instances_cost + refs_cost + 64 * 1024
    assert instances_cost <= 200 * (per_overlay + 16 * 1024) + 64 * 1024
    assert len(store.users(digest)) == 200
    assert elapsed / 200 < 0.5, 'creation took %.0f ms each' % (elapsed / 200 * 1000)


# ---------------------------------------------------------------- references

def test_image_with_instances_cannot_be_removed(store, manager):
    digest = store.resolve('boot')
    manager.ensure_present('web-1', 'boot')
    with pytest.raises(ImageInUseError, match='instance web-1'):
        store.remove_alias('boot')
    assert store.get_record(store.resolve('boot')) is not None
    assert manager.remove('web-1').action == 'remove'
    assert manager.remove('web-1').action == 'none', 'removal is idempotent'
    assert not os.path.exists(os.path.join(store.instances_dir, 'web-1'))
    assert store.remove_alias('boot') == (True, digest)
    assert list(store.iter_records()) == [] and _work_folders(store) == []


def test_failed_creation_releases_its_reference(store, manager, monkeypatch):
    digest = store.resolve('boot')

    def broken_overlay(*args, **kwargs):
        raise QemuImgError('qemu-img create failed: simulated')
    monkeypatch.setattr(instance_mod, 'create_overlay', broken_overlay)
    with pytest.raises(QemuImgError):
        manager.ensure_present('a', 'boot')
    assert store.users(digest) == [] and manager.get('a') is None and _work_folders(store) == []
    monkeypatch.undo()

    # The image disappears between the overlay and the commit: the commit,
    # under the store lock, sees it and backs out.
    real = instance_mod.create_overlay

    def racing_overlay(*args, **kwargs):
        result = real(*args, **kwargs)
        assert store.remove_alias('boot') == (True, digest)
        return result
    monkeypatch.setattr(instance_mod, 'create_overlay', racing_overlay)
    with pytest.raises(NotFoundError, match='removed while instance a was being created'):
        manager.ensure_present('a', 'boot')
    assert manager.get('a') is None and _work_folders(store) == [] and os.listdir(store.instances_dir) == []


_KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from ansible_collections.vmimage.qemu.plugins.module_utils._core import staging
    from ansible_collections.vmimage.qemu.plugins.module_utils._instance import instance
    from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    point, store, action, name = sys.argv[2:6]
    manager = instance.InstanceManager(ImageStore(store))
    if point == 'before_commit':
        instance.InstanceManager._commit = die
    elif action == 'create':  # after the rename, before the work folder's lock is gone
        staging.WorkFolder._release = die
    else:  # after the rename into the work area, before the files are deleted
        staging.remove_tree = die
    if action == 'create':
        manager.ensure_present(name, 'boot')
    else:
        manager.remove(name)
''')


@pytest.mark.parametrize('point, action', [('before_commit', 'create'), ('after_commit', 'create'),
                                           ('after_commit', 'remove')])
def test_killed_run_leaves_a_consistent_store_for_the_next_one(store, manager, tmp_path, point, action):
    digest = store.resolve('boot')
    if action == 'remove':
        manager.ensure_present('x', 'boot')
    script = tmp_path / 'kill.py'
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), COLLECTIONS, point, store.root, action, 'x'],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()

    debris = _work_folders(store)
    assert len(debris) in (1, 2)
    if point == 'before_commit':
        # The overlay was made, the reference was not: nothing holds the image.
        folder = [d for d in debris if not d.endswith('.lock')][0]
        assert os.path.exists(os.path.join(store.instances_dir, folder, 'disk.qcow2'))
        assert manager.get('x') is None and store.users(digest) == []
        assert store.remove_alias('boot', check_mode=True) == (True, digest)
    elif action == 'create':
        assert manager.get('x') is not None and store.users(digest) == ['instance x']
    else:
        assert manager.get('x') is None and store.users(digest) == []

    # The next run removes the debris (its owner is dead) and carries on.
    manager.ensure_present('y', 'boot')
    assert _work_folders(store) == []
    expected = ['x', 'y'] if (point, action) == ('after_commit', 'create') else ['y']
    assert sorted(os.listdir(store.instances_dir)) == expected
    for name in expected:
        assert sorted(os.listdir(os.path.join(store.instances_dir, name))) == ['disk.qcow2', 'instance.json']
    assert sorted(store.users(digest)) == ['instance %s' % n for n in expected]


def test_cleanup_spares_work_folders_of_live_runs(store, manager):
    work = manager.work.new('busy')
    try:
        assert manager.cleanup() == []
        assert os.path.isdir(work.path)
    finally:
        work._lock.release()  # as if its process died: the lock goes, the folder stays
    assert manager.cleanup() == [work.name]
    assert _work_folders(store) == []


def test_recreate_replaces_an_instance_of_another_image(store, manager, served):
    url, other = served['boot2']
    fetch_image(store, url, alias='boot2')
    first = manager.ensure_present('a', 'boot', machine={'memory': 48}).after
    with pytest.raises(StoreError, match='set recreate'):
        manager.ensure_present('a', 'boot2')
    with pytest.raises(StoreError, match='set recreate'):
        manager.ensure_present('a', 'boot2', check_mode=True)
    assert manager.get('a')['digest'] == first['digest']
    plan = manager.ensure_present('a', 'boot2', recreate=True, check_mode=True)
    assert plan.action == 'replace' and manager.get('a')['digest'] == first['digest']

    replaced = manager.ensure_present('a', 'boot2', recreate=True)
    assert replaced.action == 'replace'
    after = replaced.after
    assert after['digest'] == other and after['image_id'] == 'boot2'
    assert (after['mac'], after['uuid']) == (first['mac'], first['uuid']), 'the identity survives'
    assert after['machine']['memory'] == 48, 'the overrides survive'
    assert store.users(first['digest']) == [] and store.users(other) == ['instance a']
    assert manager.backing_chain('a')[1]['filename'] == os.path.join(store.image_path(other), 'layer.qcow2')
    assert manager.ensure_present('a', 'boot2').action == 'none'
    assert _work_folders(store) == []


def test_failed_replace_keeps_the_old_instance(store, manager, served, monkeypatch):
    fetch_image(store, served['boot2'][0], alias='boot2')
    first = manager.ensure_present('a', 'boot').after
    real_rename = os.rename

    def failing_commit(src, dst):
        if '/.work-' in str(src) and str(dst) == manager.instance_path('a') and '-old-' not in str(src):
            raise OSError(errno.EIO, 'simulated I/O error')
        return real_rename(src, dst)
    monkeypatch.setattr(os, 'rename', failing_commit)
    with pytest.raises(StoreError) as info:
        manager.ensure_present('a', 'boot2', recreate=True)
    # An errno the library has no kind for: the store's kind, with the action and the error.
    assert info.value.kind == 'store' and 'cannot create or update instance a in store' in str(info.value)
    assert 'simulated I/O error' in str(info.value)
    monkeypatch.undo()
    assert manager.get('a') == first and os.path.isfile(manager.disk_path('a'))
    assert store.users(first['digest']) == ['instance a'] and store.users(served['boot2'][1]) == []
    assert _work_folders(store) == []


# ---------------------------------------------------------------- owners

def _wait_for(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError('condition not met within %d s' % timeout)


def test_running_qemu_blocks_removal_and_is_reported_as_owner(store, manager):
    rec = manager.ensure_present('vm', 'boot').after
    manager.ensure_present('idle', 'boot')
    assert manager.owners('vm') == [] and not is_in_use(manager.disk_path('vm'))
    # Paused (-S): the disk is opened and locked, the guest never runs.
    proc = subprocess.Popen(manager.qemu_args(rec, accel='tcg') + ['-S', '-monitor', 'stdio'],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        owners = _wait_for(lambda: manager.owners('vm'))
        assert [(o['pid'], o['command']) for o in owners] == [(proc.pid, 'qemu-system-x86_64')]
        assert is_in_use(manager.disk_path('vm'))
        assert manager.owners_of_all(['vm', 'idle']) == {'vm': owners, 'idle': []}

        with pytest.raises(ImageInUseError, match='pid %d \\(qemu-system-x86_64' % proc.pid) as info:
            manager.remove('vm')
        assert info.value.holders == owners
        with pytest.raises(ImageInUseError) as info:
            manager.remove('vm', check_mode=True)
        assert info.value.holders == owners
        assert manager.get('vm') is not None
        assert manager.ensure_present('vm', 'boot').owners == owners
        with pytest.raises(ImageInUseError, match='instance vm'):
            store.remove_alias('boot')

        forced = manager.remove('vm', force=True)
        assert forced.action == 'remove' and forced.owners == owners
        assert manager.get('vm') is None and store.users(rec['digest']) == ['instance idle']
        # The VM runs on: its NIC carries the instance MAC.
        out, _err = proc.communicate(b'info network\nquit\n', timeout=30)
        assert ('macaddr=%s' % rec['mac']).encode() in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_LOCKER = textwrap.dedent('''
    import fcntl, os, struct, sys, time
    fd = os.open(sys.argv[1], os.O_RDONLY)
    # What QEMU does: a read OFD lock on byte 100 ("I use consistent read").
    lock = struct.pack('hhqqi', fcntl.F_RDLCK, 0, 100, 1, 0) + bytes(32)
    fcntl.fcntl(fd, getattr(fcntl, 'F_OFD_SETLK', 37), lock)
    print('locked', flush=True)
    time.sleep(60)
''')


def test_any_process_holding_the_qemu_image_lock_is_an_owner(store, manager):
    manager.ensure_present('a', 'boot')
    manager.ensure_present('b', 'boot')
    proc = subprocess.Popen([sys.executable, '-c', _LOCKER, manager.disk_path('a')], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b'locked\n'
        owners = manager.owners_of_all(['a', 'b'])
        assert [(o['pid'], o['writable']) for o in owners['a']] == [(proc.pid, False)] and owners['b'] == []
        with pytest.raises(ImageInUseError, match='pid %d' % proc.pid):
            manager.remove('a')
    finally:
        proc.kill()
        proc.wait()
    assert manager.owners('a') == []
    assert manager.remove('a').action == 'remove', 'the lock died with its process'
