# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Mutable images: creation (blank, from an archive), packing (deterministic,
idempotent without reading the disk, atomic, nothing left behind on failure),
refusal while a real QEMU has the disk open, and disposal.

Disks are 1 GiB sparse files with a few scattered extents, so every pack
reads kilobytes, not gigabytes.  Archives are checked with the library's
reader and with GNU tar + zstd; disks are compared by their data extents.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._mutable import mutable_image as mi
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.reader import extract_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    ImageInUseError, InvalidArchiveError, InvalidMachineError, LimitExceededError, NotFoundError, VmImageError,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.validator import validate_image_folder
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.machine import MACHINE_DEFAULTS, dump_machine_json
from ansible_collections.vmimage.qemu.plugins.module_utils._mutable.mutable_image import MutableImage, sidecar_path

from support.image_factory import (
    data_extents_of, extract_with_gnu_tar, make_image_folder, pattern, same_sparse_content,
)
from support.mounts import mounted_tmpfs
from support.qemu_process import QEMU, start_qemu, stop_qemu

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ('tar', 'zstd', 'qemu-img')), reason='needs GNU tar, zstd and qemu-img')

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
CHUNKS = [(0, pattern(4096, 1)), (123 * MIB + 17, pattern(70000, 2)), (700 * MIB, pattern(4 * KIB, 3)),
          (GIB - 333, pattern(333, 4))]


def write_chunks(path, chunks):
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in chunks:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    # Past the file system's timestamp granularity, so the next pack's
    # fingerprint is trusted (see test_racy_fingerprint_is_verified_by_packing).
    time.sleep(0.05)


def listing(folder):
    return sorted(os.listdir(str(folder)))


def sha256_of(path):
    with open(path, 'rb') as f:
        return 'sha256:' + hashlib.sha256(f.read()).hexdigest()


def read_extracted(archive, dest):
    os.makedirs(dest)
    with open(archive, 'rb') as f:
        extract_image_archive(f, dest)
    return dest


@pytest.fixture
def image(tmp_path):
    img = MutableImage.create_blank(str(tmp_path / 'img'), 1, {'memory': 512})
    write_chunks(img.disk, CHUNKS)
    return img


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / 'out'
    folder.mkdir()
    return str(folder)


# ---------------------------------------------------------------- creation

def test_create_blank_is_sparse_with_validated_machine(tmp_path):
    img = MutableImage.create_blank(str(tmp_path / 'b'), 2, {'memory': 1024, 'cores': 2})
    assert listing(img.path) == ['disk.img', 'machine.json']
    assert listing(tmp_path) == ['b'], 'no staging folder left beside it'
    assert os.path.getsize(img.disk) == 2 * GIB
    assert os.stat(img.disk).st_blocks == 0 and data_extents_of(img.disk) == []
    with open(img.machine_path, 'rb') as f:
        raw = f.read()
    machine = json.loads(raw)
    assert raw == dump_machine_json(machine), 'canonical bytes'
    assert machine['memory'] == 1024 and machine['cores'] == 2 and machine['version'] == 1
    for key, value in MACHINE_DEFAULTS.items():
        if key not in ('memory', 'cores'):
            assert machine[key] == value
    assert 'uuid' not in machine and 'mac' not in machine, 'no shared identity baked into the image'
    assert img.inspect().machine == machine and img.format == 'raw'
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(img.path).st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(img.disk).st_mode & 0o777 == 0o666 & ~umask


def test_create_blank_keeps_a_given_identity():
    machine = mi.blank_machine({'uuid': '6a2d1f3e-5b7c-4d8e-9f0a-1b2c3d4e5f60', 'mac': '02:11:22:33:44:55'})
    assert machine['uuid'] == '6a2d1f3e-5b7c-4d8e-9f0a-1b2c3d4e5f60' and machine['mac'] == '02:11:22:33:44:55'
    assert mi.blank_machine(None)['version'] == 1


@pytest.mark.parametrize('machine, field', [
    ({'memory': 0}, 'memory'),
    ({'network': 'virtio-net'}, 'network'),
    ({'mac': '01:00:00:00:00:00'}, 'mac'),
    ({'bogus': 1}, 'bogus'),
    ({'version': 2}, 'version'),
])
def test_create_blank_rejects_invalid_machine_and_leaves_nothing(tmp_path, machine, field):
    with pytest.raises(InvalidMachineError) as info:
        MutableImage.create_blank(str(tmp_path / 'b'), 1, machine)
    assert field in str(info.value)
    assert listing(tmp_path) == []


def test_create_blank_size_limits(tmp_path):
    with pytest.raises(LimitExceededError, match='limit of 80 GiB'):
        MutableImage.create_blank(str(tmp_path / 'b'), 81)
    with pytest.raises(LimitExceededError, match='limit of 3 GiB'):
        MutableImage.create_blank(str(tmp_path / 'b'), 4, max_size_gib=3)
    for bad in (0, -1, True, 1.5, '2'):
        with pytest.raises(ValueError):
            MutableImage.create_blank(str(tmp_path / 'b'), bad)
    assert listing(tmp_path) == []
    MutableImage.create_blank(str(tmp_path / 'b'), 3, max_size_gib=3)
    assert os.path.getsize(str(tmp_path / 'b' / 'disk.img')) == 3 * GIB


def test_create_refuses_existing_path_and_missing_parent(tmp_path):
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'empty').mkdir()
    for name in ('file', 'empty'):
        with pytest.raises(VmImageError, match='already exists'):
            MutableImage.create_blank(str(tmp_path / name), 1)
    with pytest.raises(NotFoundError, match='parent folder'):
        MutableImage.create_blank(str(tmp_path / 'no' / 'such'), 1)
    assert listing(tmp_path) == ['empty', 'file']


def _original_archive(tmp_path):
    """An archive as the collection packs them, of a folder whose layer
    qemu-img made the way the original packager did."""
    folder = make_image_folder(str(tmp_path / 'orig'), disk_size=64 * MIB,
                               chunks=[(0, pattern(8192, 5)), (40 * MIB + 5, pattern(30000, 6))],
                               machine={'version': 1, 'memory': 256, 'network': 'rtl8139'})
    archive = str(tmp_path / 'orig.tar.zst')
    with open(archive, 'wb') as f:
        write_image_archive(folder, f)
    return folder, archive


def test_from_archive_drops_layer_and_repacks_to_the_same_bytes(tmp_path, out):
    folder, archive = _original_archive(tmp_path)
    img = MutableImage.create_from_archive(str(tmp_path / 'm'), archive)
    assert listing(img.path) == ['disk.img', 'machine.json']
    assert same_sparse_content(img.disk, os.path.join(folder, 'disk.img'))
    with open(img.machine_path, 'rb') as a, open(os.path.join(folder, 'machine.json'), 'rb') as b:
        assert a.read() == b.read(), 'machine.json kept byte for byte'
    assert img.inspect().machine['network'] == 'rtl8139'
    assert os.access(img.disk, os.W_OK)
    assert sorted(n for n in listing(tmp_path) if n.startswith('.')) == [], 'no staging folder left'

    result = img.package(os.path.join(out, 'again.tar.zst'))
    with open(archive, 'rb') as f:
        original = f.read()
    with open(result.dest, 'rb') as f:
        assert f.read() == original, 'an unmodified image packs to the archive it came from'
    assert result.digest == 'sha256:' + hashlib.sha256(original).hexdigest()


def test_from_archive_modify_pack_differs_only_as_expected(tmp_path, out):
    folder, archive = _original_archive(tmp_path)
    img = MutableImage.create_from_archive(str(tmp_path / 'm'), archive)
    change = (20 * MIB + 3, pattern(5000, 9))
    write_chunks(img.disk, [change])
    result = img.package(os.path.join(out, 'new.tar.zst'))
    assert result.changed and result.digest != sha256_of(archive)

    old = read_extracted(archive, str(tmp_path / 'x-old'))
    new = read_extracted(result.dest, str(tmp_path / 'x-new'))
    for name in ('layer.qcow2', 'machine.json'):
        with open(os.path.join(old, name), 'rb') as a, open(os.path.join(new, name), 'rb') as b:
            assert a.read() == b.read(), name
    old_disk, new_disk = os.path.join(old, 'disk.img'), os.path.join(new, 'disk.img')
    assert os.path.getsize(old_disk) == os.path.getsize(new_disk)
    assert not same_sparse_content(old_disk, new_disk)
    # Put the change into the old disk: then they are the same.
    write_chunks(old_disk, [change])
    assert same_sparse_content(old_disk, new_disk)
    validate_image_folder(new)


def test_from_archive_rejects_bad_archives_and_leaves_nothing(tmp_path):
    bad = tmp_path / 'bad.tar.zst'
    bad.write_bytes(b'not an archive at all')
    with pytest.raises(InvalidArchiveError):
        MutableImage.create_from_archive(str(tmp_path / 'm'), str(bad))
    with pytest.raises(VmImageError, match='cannot read archive'):
        MutableImage.create_from_archive(str(tmp_path / 'm'), str(tmp_path / 'missing.tar.zst'))
    with pytest.raises(VmImageError, match='not a regular file'):
        MutableImage.create_from_archive(str(tmp_path / 'm'), str(tmp_path))
    os.mkfifo(str(tmp_path / 'fifo'))
    with pytest.raises(VmImageError, match='not a regular file'):
        MutableImage.create_from_archive(str(tmp_path / 'm'), str(tmp_path / 'fifo'))
    assert listing(tmp_path) == ['bad.tar.zst', 'fifo']


# ---------------------------------------------------------------- packing

def test_pack_is_deterministic_and_readable_by_reader_and_gnu_tar(image, tmp_path, out):
    first = image.package(os.path.join(out, 'a.tar.zst'))
    second = image.package(os.path.join(out, 'b.tar.zst'), threads=1)
    assert first.changed and first.packed and second.changed and second.packed
    with open(first.dest, 'rb') as a, open(second.dest, 'rb') as b:
        assert a.read() == b.read()
    assert first.digest == second.digest == sha256_of(first.dest)
    assert first.archive_size == os.path.getsize(first.dest)
    assert first.virtual_size == GIB
    assert first.data_bytes == sum(n for _offset, n in data_extents_of(image.disk))
    assert listing(image.path) == ['disk.img', 'machine.json'], 'layer.qcow2 exists only while packing'
    assert listing(out) == ['a.tar.zst', 'a.tar.zst.vmimage.json', 'b.tar.zst', 'b.tar.zst.vmimage.json']

    ours = read_extracted(first.dest, str(tmp_path / 'x-ours'))
    info = validate_image_folder(ours)
    assert info.virtual_size == GIB and info.machine['memory'] == 512
    gnu = extract_with_gnu_tar(first.dest, str(tmp_path / 'x-gnu'))
    for name in ('disk.img', 'layer.qcow2', 'machine.json'):
        assert same_sparse_content(os.path.join(gnu, name), os.path.join(ours, name)), name
    assert same_sparse_content(os.path.join(gnu, 'disk.img'), image.disk)
    assert os.stat(os.path.join(gnu, 'disk.img')).st_blocks * 512 < 4 * MIB, 'extracted sparse'
    layer = json.loads(subprocess.run(['qemu-img', 'info', '-U', '--output', 'json', '-f', 'qcow2',
                                       os.path.join(gnu, 'layer.qcow2')],
                                      check=True, stdout=subprocess.PIPE).stdout)
    assert layer['backing-filename'] == 'disk.img' and layer['backing-filename-format'] == 'raw'
    assert layer['virtual-size'] == GIB and layer['format-specific']['data']['lazy-refcounts'] is True


def test_idempotent_repack_reads_nothing(image, out, monkeypatch):
    dest = os.path.join(out, 'img.tar.zst')
    first = image.package(dest)
    before = os.stat(dest)

    def no_packing(*args, **kwargs):
        raise AssertionError('packed again although nothing changed')

    monkeypatch.setattr(mi, 'write_image_archive', no_packing)
    monkeypatch.setattr(mi, 'create_overlay', no_packing)
    monkeypatch.setattr(mi, '_sha256_file', no_packing)
    for _repeat in range(3):
        again = image.package(dest)
        assert (again.changed, again.packed) == (False, False)
        assert again.digest == first.digest and again.archive_size == first.archive_size
        assert again.virtual_size == GIB and again.data_bytes == first.data_bytes
    after = os.stat(dest)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), 'dest not rewritten'
    checked = image.package(dest, check_mode=True)
    assert (checked.changed, checked.digest) == (False, first.digest)


def test_sidecar_records_archive_and_source(image, out):
    dest = os.path.join(out, 'img.tar.zst')
    result = image.package(dest, level=5)
    with open(sidecar_path(dest)) as f:
        sidecar = json.load(f)
    st = os.stat(dest)
    assert sidecar['archive'] == {'digest': result.digest, 'identity': {
        'dev': st.st_dev, 'ino': st.st_ino, 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}}
    disk = os.stat(image.disk)
    assert sidecar['source']['disk'] == {'dev': disk.st_dev, 'ino': disk.st_ino, 'size': GIB,
                                         'mtime_ns': disk.st_mtime_ns, 'ctime_ns': disk.st_ctime_ns}
    with open(image.machine_path, 'rb') as f:
        assert sidecar['source']['machine_sha256'] == hashlib.sha256(f.read()).hexdigest()
    assert sidecar['source']['level'] == 5 and sidecar['racy'] is False
    assert sidecar['source']['qemu_img'][0].endswith('qemu-img')


@pytest.mark.parametrize('what', ['disk', 'machine', 'level', 'dest-replaced', 'dest-removed', 'force'])
def test_changes_are_noticed(image, out, what):
    dest = os.path.join(out, 'img.tar.zst')
    first = image.package(dest)
    level = 3
    force = False
    if what == 'disk':
        write_chunks(image.disk, [(5 * MIB, b'changed')])
    elif what == 'machine':
        with open(image.machine_path, 'wb') as f:
            f.write(dump_machine_json({'version': 1, 'memory': 2048}))
    elif what == 'level':
        level = 19
    elif what == 'dest-replaced':
        os.unlink(dest)
        with open(dest, 'wb') as f:
            f.write(b'something else')
    elif what == 'dest-removed':
        os.unlink(dest)
    elif what == 'force':
        force = True
    plan = image.package(dest, level=level, force=force, check_mode=True)
    if what == 'force':
        # A forced pack of an unchanged folder gives the same bytes.
        assert plan.changed is False and plan.digest == first.digest
    else:
        assert plan.changed is True and plan.packed is False and plan.digest is None and plan.reason
    again = image.package(dest, level=level, force=force)
    assert again.packed is True
    if what == 'force':
        assert again.changed is False and again.digest == first.digest, 'same bytes: no change'
    elif what == 'level':
        assert again.changed is (again.digest != first.digest)
    else:
        assert again.changed is True
    if what in ('dest-replaced', 'dest-removed'):
        assert again.digest == first.digest
    assert sha256_of(dest) == again.digest
    final = image.package(dest, level=level)
    assert (final.changed, final.packed) == (False, False)


def test_check_mode_predicts_and_writes_nothing(image, out):
    dest = os.path.join(out, 'img.tar.zst')
    plan = image.package(dest, check_mode=True)
    assert plan.changed is True and plan.packed is False and plan.reason == 'dest does not exist'
    assert plan.virtual_size == GIB
    assert listing(out) == [] and listing(image.path) == ['disk.img', 'machine.json']


def test_lost_sidecar_costs_a_pack_but_no_change(image, out):
    dest = os.path.join(out, 'img.tar.zst')
    first = image.package(dest)
    mtime = os.stat(dest).st_mtime_ns
    os.unlink(sidecar_path(dest))
    again = image.package(dest)
    assert (again.changed, again.packed) == (False, True)
    assert again.previous_digest == first.digest and os.stat(dest).st_mtime_ns == mtime, 'dest kept as it was'
    assert os.path.exists(sidecar_path(dest))
    assert (image.package(dest).packed) is False


def test_corrupt_sidecar_is_ignored(image, out):
    dest = os.path.join(out, 'img.tar.zst')
    image.package(dest)
    with open(sidecar_path(dest), 'w') as f:
        f.write('{not json')
    again = image.package(dest)
    assert (again.changed, again.packed) == (False, True)


def test_racy_fingerprint_is_verified_by_packing(image, out, monkeypatch):
    dest = os.path.join(out, 'img.tar.zst')
    monkeypatch.setattr(mi, '_is_racy', lambda st, snapshot: True)
    first = image.package(dest)
    with open(sidecar_path(dest)) as f:
        assert json.load(f)['racy'] is True
    monkeypatch.undo()
    second = image.package(dest)
    assert (second.changed, second.packed, second.digest) == (False, True, first.digest)
    third = image.package(dest)
    assert (third.changed, third.packed) == (False, False)


def test_racy_rule():
    class St(object):
        def __init__(self, mtime, ctime):
            self.st_mtime_ns, self.st_ctime_ns = mtime, ctime

    now = 1800000000 * 10 ** 9 + 123456789
    assert mi._is_racy(St(now - 5 * 10 ** 6, now - 5 * 10 ** 6), now)
    assert not mi._is_racy(St(now - 10 ** 9, now - 10 ** 9), now)
    # Whole-second timestamps: the file system is coarse, 2 s window.
    whole = (now // 10 ** 9 - 1) * 10 ** 9
    assert mi._is_racy(St(whole, whole), now)
    assert not mi._is_racy(St(whole - 3 * 10 ** 9, whole - 3 * 10 ** 9), now)


def test_pack_writes_the_canonical_layer_and_refuses_a_used_one(image, out):
    dest = os.path.join(out, 'img.tar.zst')
    # A canonical layer already there is fine (and removed afterwards).
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', 'disk.img', '-o',
                    'lazy_refcounts=on', 'layer.qcow2', str(GIB)], cwd=image.path, check=True)
    first = image.package(dest)
    assert listing(image.path) == ['disk.img', 'machine.json']
    # A layer a VM wrote to holds data the archive's layer would not: refused.
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', 'disk.img',
                    'layer.qcow2'], cwd=image.path, check=True)
    subprocess.run(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x42 0 64k', 'layer.qcow2'], cwd=image.path,
                   check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(image.path, 'layer.qcow2'), 'rb') as f:
        used = f.read()
    with pytest.raises(VmImageError, match='qemu-img commit'):
        image.package(os.path.join(out, 'other.tar.zst'))
    with open(os.path.join(image.path, 'layer.qcow2'), 'rb') as f:
        assert f.read() == used, 'the refused layer is left untouched'
    assert listing(out) == ['img.tar.zst', 'img.tar.zst.vmimage.json']
    forced = image.package(os.path.join(out, 'other.tar.zst'), force=True)
    assert forced.digest == first.digest
    assert listing(image.path) == ['disk.img', 'machine.json']


def test_pack_refuses_bad_destinations(image, out, tmp_path):
    with pytest.raises(VmImageError, match='outside the mutable image'):
        image.package(os.path.join(image.path, 'x.tar.zst'))
    with pytest.raises(NotFoundError, match='destination folder'):
        image.package(str(tmp_path / 'nope' / 'x.tar.zst'))
    with pytest.raises(VmImageError, match='is a folder'):
        image.package(out)
    for level in (0, 20, 'x'):
        with pytest.raises(ValueError, match='compression_level'):
            image.package(os.path.join(out, 'x.tar.zst'), level=level)
    assert listing(out) == []


def test_pack_refuses_broken_folders(tmp_path, out):
    folder = tmp_path / 'f'
    folder.mkdir()
    with pytest.raises(VmImageError, match='disk.img is missing'):
        MutableImage(str(folder)).package(os.path.join(out, 'x.tar.zst'))
    with open(str(folder / 'disk.img'), 'wb') as f:
        f.truncate(1000)
    (folder / 'machine.json').write_text('{"version": 1}')
    with pytest.raises(VmImageError, match='multiple of 512'):
        MutableImage(str(folder)).package(os.path.join(out, 'x.tar.zst'))
    with open(str(folder / 'disk.img'), 'wb') as f:
        f.truncate(MIB)
    (folder / 'machine.json').write_text('{"version": 1, "memory": "lots"}')
    with pytest.raises(InvalidMachineError):
        MutableImage(str(folder)).package(os.path.join(out, 'x.tar.zst'))
    with pytest.raises(NotFoundError):
        MutableImage(str(tmp_path / 'none')).package(os.path.join(out, 'x.tar.zst'))
    assert listing(out) == []


# ---------------------------------------------------------------- failures

def _assert_nothing_left(image, out, expected=()):
    assert listing(out) == sorted(expected), 'no temporary or partial archive'
    assert listing(image.path) == ['disk.img', 'machine.json'], 'no intermediate layer left'


def test_failure_while_writing_leaves_nothing(image, out, monkeypatch):
    dest = os.path.join(out, 'img.tar.zst')

    def half_then_fail(folder, fileobj, **kwargs):
        fileobj.write(b'partial archive bytes' * 1000)
        fileobj.flush()
        assert any(n.startswith('.vmimage-work-pack-') for n in os.listdir(out)), 'writes go to a work folder'
        assert os.path.exists(os.path.join(folder, 'layer.qcow2'))
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(mi, 'write_image_archive', half_then_fail)
    with pytest.raises(VmImageError, match='cannot write archive .*: no space left on device'):
        image.package(dest)
    _assert_nothing_left(image, out)


def test_failure_keeps_the_previous_archive_and_sidecar(image, out, monkeypatch):
    dest = os.path.join(out, 'img.tar.zst')
    first = image.package(dest)
    with open(sidecar_path(dest), 'rb') as f:
        sidecar = f.read()
    write_chunks(image.disk, [(MIB, b'new data')])

    def fail(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr(mi, 'write_image_archive', fail)
    with pytest.raises(KeyboardInterrupt):
        image.package(dest)
    _assert_nothing_left(image, out, ['img.tar.zst', 'img.tar.zst.vmimage.json'])
    assert sha256_of(dest) == first.digest
    with open(sidecar_path(dest), 'rb') as f:
        assert f.read() == sidecar


def test_disk_written_during_pack_is_refused(image, out, monkeypatch):
    real = mi.write_image_archive

    def write_while_packing(folder, fileobj, **kwargs):
        result = real(folder, fileobj, **kwargs)
        write_chunks(image.disk, [(3 * MIB, b'late write')])
        return result

    monkeypatch.setattr(mi, 'write_image_archive', write_while_packing)
    with pytest.raises(VmImageError, match='changed while it was being packed'):
        image.package(os.path.join(out, 'img.tar.zst'))
    _assert_nothing_left(image, out)


def test_stale_temporary_archives_are_removed_live_ones_kept(image, out):
    import fcntl
    dest = os.path.join(out, 'img.tar.zst')
    stale = dest + '.tmp-dead01'
    live = dest + '.tmp-live01'
    young = dest + '.tmp-young1'
    for path in (stale, live, young):
        with open(path, 'wb') as f:
            f.write(b'half')
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        image.package(dest)
        assert listing(out) == sorted(['img.tar.zst', 'img.tar.zst.vmimage.json', os.path.basename(live),
                                       os.path.basename(young)])
    finally:
        os.close(fd)


def test_concurrent_packs_to_one_dest_agree(image, out):
    dest = os.path.join(out, 'img.tar.zst')
    results = []
    errors = []

    def pack():
        try:
            results.append(MutableImage(image.path).package(dest))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=pack) for _i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r.digest for r in results}) == 1 and sha256_of(dest) == results[0].digest
    assert sum(r.packed for r in results) == 1, 'the folder lock serialises them; the rest find it done'
    assert listing(out) == ['img.tar.zst', 'img.tar.zst.vmimage.json']
    assert listing(image.path) == ['disk.img', 'machine.json']


def test_waiting_for_another_task_times_out_clearly(image, out):
    import fcntl
    fd = os.open(image.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        busy = MutableImage(image.path, lock_timeout=0.2)
        with pytest.raises(ImageInUseError, match='waiting for the lock of mutable image'):
            busy.package(os.path.join(out, 'img.tar.zst'))
        with pytest.raises(ImageInUseError, match='waiting for the lock of mutable image'):
            busy.dispose()
    finally:
        os.close(fd)
    assert listing(out) == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which('mount'), reason='mounting a tmpfs needs root')
def test_disk_full_leaves_nothing(tmp_path):
    img = MutableImage.create_blank(str(tmp_path / 'img'), 1)
    write_chunks(img.disk, [(i * 64 * MIB, os.urandom(MIB)) for i in range(4)])
    with mounted_tmpfs(str(tmp_path / 'small'), 'size=1m,mode=0755') as small:
        with pytest.raises(VmImageError, match='no space left on device') as info:
            img.package(os.path.join(small, 'img.tar.zst'))
        assert info.value.kind == 'no_space'
        assert listing(small) == []
    assert listing(img.path) == ['disk.img', 'machine.json']


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which('mount'), reason='mounting a tmpfs needs root')
def test_read_only_destination_fails_clearly(image, tmp_path):
    with mounted_tmpfs(str(tmp_path / 'ro'), 'ro,size=1m') as ro:
        with pytest.raises(VmImageError, match='cannot write an archive in .*: read-only file system') as info:
            image.package(os.path.join(ro, 'img.tar.zst'))
        assert info.value.kind == 'permission'
    assert listing(image.path) == ['disk.img', 'machine.json']


@pytest.mark.skipif(os.geteuid() == 0, reason='root ignores directory permissions')
def test_unwritable_destination_fails_clearly(image, out):
    os.chmod(out, 0o555)
    try:
        with pytest.raises(VmImageError, match='permission denied'):
            image.package(os.path.join(out, 'img.tar.zst'))
    finally:
        os.chmod(out, 0o755)
    assert listing(out) == []


# ---------------------------------------------------------------- in use

@pytest.mark.skipif(QEMU is None, reason='needs qemu-system-x86_64')
def test_running_qemu_blocks_pack_and_dispose(image, out):
    dest = os.path.join(out, 'img.tar.zst')
    proc = start_qemu(image.disk, attach=True)
    try:
        for action in (lambda: image.package(dest), lambda: image.package(dest, check_mode=True),
                       image.dispose, lambda: image.dispose(check_mode=True),
                       lambda: image.dispose(force=True)):
            with pytest.raises(ImageInUseError) as info:
                action()
            message = str(info.value)
            assert image.path in message and 'pid %d' % proc.pid in message and 'qemu-system' in message
            assert info.value.holders[0]['pid'] == proc.pid
        assert listing(out) == [] and listing(image.path) == ['disk.img', 'machine.json']
    finally:
        stop_qemu(proc)
    assert image.package(dest).changed
    assert image.dispose() is True and not os.path.exists(image.path)


@pytest.mark.skipif(QEMU is None, reason='needs qemu-system-x86_64')
def test_qemu_on_an_overlay_in_the_folder_blocks_pack(image, out):
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', 'disk.img', 'layer.qcow2'],
                   cwd=image.path, check=True)
    proc = start_qemu(image.layer, fmt='qcow2')
    try:
        with pytest.raises(ImageInUseError):
            image.package(os.path.join(out, 'img.tar.zst'))
    finally:
        stop_qemu(proc)
    assert os.path.exists(image.layer)


# ---------------------------------------------------------------- disposal

def test_dispose(image, tmp_path):
    assert image.dispose(check_mode=True) is True and os.path.isdir(image.path)
    assert image.dispose() is True
    assert not os.path.exists(image.path) and listing(tmp_path) == [], 'nothing left beside it either'
    assert image.dispose() is False


def test_dispose_refuses_what_is_not_a_mutable_image(tmp_path, image):
    other = tmp_path / 'home'
    other.mkdir()
    (other / 'notes.txt').write_text('keep me')
    for force in (False, True):
        with pytest.raises(VmImageError, match='not a mutable image'):
            MutableImage(str(other)).dispose(force=force)
    (tmp_path / 'plain').write_text('x')
    with pytest.raises(VmImageError, match='not a folder'):
        MutableImage(str(tmp_path / 'plain')).dispose(force=True)
    with open(os.path.join(image.path, 'notes.txt'), 'w') as f:
        f.write('mine')
    with pytest.raises(VmImageError, match='notes.txt'):
        image.dispose()
    assert os.path.exists(os.path.join(image.path, 'notes.txt'))
    assert image.dispose(force=True) is True and not os.path.exists(image.path)
    assert (other / 'notes.txt').read_text() == 'keep me'


def test_gnu_tar_archive_round_trips_through_a_mutable_image(tmp_path, out):
    """Archives made by the original packager (GNU tar -S | zstd) load too."""
    from support.image_factory import gnu_tar_archive
    folder = make_image_folder(str(tmp_path / 'orig'), disk_size=32 * MIB,
                               chunks=[(MIB, pattern(20000, 7))])
    archive = gnu_tar_archive(folder, str(tmp_path / 'gnu.tar.zst'))
    img = MutableImage.create_from_archive(str(tmp_path / 'm'), archive)
    assert same_sparse_content(img.disk, os.path.join(folder, 'disk.img'))
    result = img.package(os.path.join(out, 'ours.tar.zst'))
    extracted = read_extracted(result.dest, str(tmp_path / 'x'))
    assert same_sparse_content(os.path.join(extracted, 'disk.img'), os.path.join(folder, 'disk.img'))
    with open(os.path.join(extracted, 'machine.json'), 'rb') as a, \
            open(os.path.join(folder, 'machine.json'), 'rb') as b:
        assert a.read() == b.read()
