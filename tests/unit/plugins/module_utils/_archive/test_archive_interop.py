# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Interoperability of the archive reader and writer with GNU tar and the zstd CLI.

Archives in the wild come from ``tar -S ... | zstd``, in whichever sparse
layout that tar used; archives we write must extract with ``zstd -dc | tar
-S -x``.  Files are compared by size and the content of their data extents
(never by reading holes), and extracted disks must stay sparse.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import shutil
import subprocess

import pytest
import zstandard

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.reader import extract_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import InvalidArchiveError
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.zstd_codec import ZstdFrameTracker

from support.image_factory import (
    BLOCK, MEMBERS, SPARSE_VERSIONS, allocated_bytes, data_bytes_of, data_extents_of, describe_difference,
    extract_with_gnu_tar, gnu_tar_archive, gnu_tar_bytes, make_image_folder, make_sparse_file, pattern,
    same_sparse_content,
    zstd_cli_compress, zstd_decompress, zstd_frames,
)

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ('tar', 'zstd', 'qemu-img')),
    reason='needs GNU tar, the zstd CLI and qemu-img')

KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB


# ---------------------------------------------------------------- disk shapes

def _many_extents(count=3000, stride=8 * KIB):
    return [(i * stride + (i % 7) * 64, pattern(512, i)) for i in range(count)]


HUGE = 9 * GIB + 1234  # > 8 GiB apparent and not a multiple of 512

# id -> (disk size, chunks)
SHAPES = {
    'typical': (64 * MIB, [(0, pattern(4096, 1)), (32 * MIB + 100, pattern(9000, 2)),
                           (64 * MIB - 777, pattern(777, 3))]),
    'empty': (0, []),
    'all-holes': (5 * MIB, []),
    'no-holes': (256 * KIB + 100, [(0, pattern(256 * KIB + 100, 4))]),
    'data-at-very-end': (3 * MIB, [(3 * MIB - 1, b'\x7f')]),
    'size-not-512-multiple': (1000003, [(0, b'first'), (500000, pattern(3000, 5)), (1000003 - 3, b'end')]),
    'size-512-not-4096-multiple': (40 * 4096 + 512, [(40 * 4096 + 512 - 200, pattern(200, 6))]),
    'hole-at-end': (2 * MIB + 333, [(12345, pattern(10000, 7))]),
    'many-extents-3000': (3000 * 8 * KIB, _many_extents()),
    'over-8GiB': (HUGE, [(0, pattern(4096, 8)), (8 * GIB + 4096, pattern(8192, 9)), (HUGE - 10, b'0123456789')]),
}
SHAPE_IDS = sorted(SHAPES)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """Source image folders, one per shape, built once (qemu-img makes the layer)."""
    root = tmp_path_factory.mktemp('sources')
    cache = {}

    def get(shape):
        if shape not in cache:
            size, chunks = SHAPES[shape]
            cache[shape] = make_image_folder(str(root / shape), size, chunks)
        return cache[shape]
    return get


def _expected_data(folder):
    return data_bytes_of(os.path.join(folder, 'disk.img'))


def _assert_same_members(src, dst):
    for name in MEMBERS:
        a, b = os.path.join(src, name), os.path.join(dst, name)
        assert os.path.isfile(b) and not os.path.islink(b), name
        assert same_sparse_content(a, b), '%s: %s' % (name, describe_difference(a, b))


def _assert_sparse(src_folder, dst_folder):
    """The extracted disk holds about as much as the source's data, not its apparent size."""
    src = os.path.join(src_folder, 'disk.img')
    dst = os.path.join(dst_folder, 'disk.img')
    src_extents = data_extents_of(src)
    data = sum(n for _offset, n in src_extents)
    allocated = allocated_bytes(dst)
    # One file-system block of slack at each end of each extent, plus metadata.
    bound = data + 2 * 4096 * len(src_extents) + 64 * KIB
    assert allocated <= bound, '%d bytes allocated for %d bytes of data (apparent %d)' % (
        allocated, data, os.path.getsize(dst))
    assert data_bytes_of(dst) <= bound


def _extract(archive, folder, **kw):
    os.mkdir(folder)
    with open(archive, 'rb') as f:
        return extract_image_archive(f, folder, **kw)


# ---------------------------------------------------------------- (a) GNU tar -> our reader

def _version_id(v):
    return 'gnu-default' if v is None else 'posix-' + v


@pytest.mark.parametrize('shape', SHAPE_IDS)
@pytest.mark.parametrize('version', SPARSE_VERSIONS, ids=_version_id)
def test_gnu_tar_archives_load(folders, tmp_path, shape, version):
    src = folders(shape)
    archive = gnu_tar_archive(src, tmp_path / 'image.tar.zst', sparse_version=version)
    result = _extract(archive, str(tmp_path / 'out'))
    out = str(tmp_path / 'out')
    assert sorted(os.listdir(out)) == sorted(MEMBERS)
    _assert_same_members(src, out)
    _assert_sparse(src, out)
    disk = result.members['disk.img']
    assert disk.size == SHAPES[shape][0]
    if data_extents_of(os.path.join(src, 'disk.img')) not in ([], [(0, disk.size)]):
        # A file with holes is stored sparse, in the layout asked for.
        expected = {None: 'gnu', '0.0': 'pax-0.0', '0.1': 'pax-0.1', '1.0': 'pax-1.0'}[version]
        assert disk.sparse_format == expected
        assert disk.stored_bytes == _expected_data(src)


def test_gnu_default_layout_uses_base256_beyond_8gib(folders):
    """The > 8 GiB case really exercises base-256 numbers in old GNU headers."""
    head = gnu_tar_bytes(folders('over-8GiB'), members=['disk.img'])[:BLOCK]
    assert head[156:157] == b'S'
    assert head[483:484] == b'\x80'  # realsize in base-256


@pytest.mark.parametrize('version', SPARSE_VERSIONS, ids=_version_id)
def test_gnu_tar_stream_split_into_zstd_frames(folders, tmp_path, version):
    """The reader reads across frames, wherever the frame boundaries fall."""
    src = folders('many-extents-3000')
    tar = gnu_tar_bytes(src, sparse_version=version)
    cuts = [BLOCK * 3 + 17, len(tar) // 2 + 1, len(tar) - BLOCK - 5]
    archive = tmp_path / 'frames.tar.zst'
    archive.write_bytes(zstd_frames(tar, cuts))
    _extract(str(archive), str(tmp_path / 'out'))
    _assert_same_members(src, str(tmp_path / 'out'))
    _assert_sparse(src, str(tmp_path / 'out'))


def test_zstd_cli_long_window_within_limits(folders, tmp_path):
    """``zstd --long=27`` (128 MiB window, the default limit) is accepted."""
    src = folders('typical')
    archive = tmp_path / 'long.tar.zst'
    archive.write_bytes(zstd_cli_compress(gnu_tar_bytes(src), long_window=27))
    _extract(str(archive), str(tmp_path / 'out'))
    _assert_same_members(src, str(tmp_path / 'out'))


@pytest.mark.parametrize('zstd_args', [['-T2'], ['--no-check'], ['-T2', '--no-check', '-1']], ids=' '.join)
def test_gnu_tar_through_zstd_cli_options(folders, tmp_path, zstd_args):
    """``tar | zstd -T2`` (a 64 MiB stream: several zstd jobs, still one
    frame) and ``--no-check`` (no content checksum) load; the same stream cut
    inside its last block or checksum does not."""
    src = folders('typical')
    tar = gnu_tar_bytes(src, sparse=False)
    data = zstd_cli_compress(tar, extra=zstd_args)
    checksum = '--no-check' not in zstd_args
    assert zstandard.get_frame_parameters(data).has_checksum == checksum
    frames = ZstdFrameTracker()
    frames.feed(data)
    frames.check_complete()
    assert (frames.frames, frames.checksummed_frames) == (1, int(checksum))
    archive = tmp_path / 'cli.tar.zst'
    archive.write_bytes(data)
    result = _extract(str(archive), str(tmp_path / 'out'))
    assert result.compressed_bytes == len(data) and result.decompressed_bytes == len(tar)
    _assert_same_members(src, str(tmp_path / 'out'))
    for cut in (len(data) - 1, len(data) - 4, len(data) - 9):
        archive.write_bytes(data[:cut])
        with pytest.raises(InvalidArchiveError, match='ends inside a frame'):
            _extract(str(archive), str(tmp_path / ('cut%d' % cut)))


@pytest.mark.skipif(not shutil.which('pzstd'), reason='needs pzstd')
def test_gnu_tar_through_pzstd_frames(folders, tmp_path):
    """pzstd writes several frames, each after a skippable frame giving its size."""
    src = folders('typical')
    tar = gnu_tar_bytes(src, sparse=False)
    data = subprocess.run(['pzstd', '-q', '-c', '-p', '2', '-3'], input=tar, check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout
    frames = ZstdFrameTracker()
    frames.feed(data)
    frames.check_complete()
    assert frames.frames >= 2 and frames.skippable_frames == frames.frames
    archive = tmp_path / 'pzstd.tar.zst'
    archive.write_bytes(data)
    _extract(str(archive), str(tmp_path / 'out'))
    _assert_same_members(src, str(tmp_path / 'out'))


# ---------------------------------------------------------------- (b) our writer -> GNU tar

@pytest.mark.parametrize('shape', SHAPE_IDS)
def test_our_archives_extract_with_gnu_tar(folders, tmp_path, shape):
    src = folders(shape)
    archive = str(tmp_path / 'image.tar.zst')
    with open(archive, 'wb') as f:
        packed = write_image_archive(src, f)
    assert packed.disk_size == SHAPES[shape][0]
    assert packed.data_bytes == _expected_data(src)
    assert packed.archive_size == os.path.getsize(archive)
    out = extract_with_gnu_tar(archive, tmp_path / 'gnu')
    assert sorted(os.listdir(out)) == sorted(MEMBERS)
    _assert_same_members(src, out)
    _assert_sparse(src, out)


@pytest.mark.parametrize('shape', SHAPE_IDS)
def test_our_archives_round_trip_through_our_reader(folders, tmp_path, shape):
    src = folders(shape)
    archive = str(tmp_path / 'image.tar.zst')
    with open(archive, 'wb') as f:
        write_image_archive(src, f)
    result = _extract(archive, str(tmp_path / 'out'))
    _assert_same_members(src, str(tmp_path / 'out'))
    _assert_sparse(src, str(tmp_path / 'out'))
    assert result.members['disk.img'].sparse_format == 'pax-1.0'
    assert result.compressed_bytes == os.path.getsize(archive)


def test_our_archive_resplit_into_frames_reads_everywhere(folders, tmp_path):
    """Re-framing our tar stream changes nothing for our reader nor for GNU tar."""
    src = folders('typical')
    archive = str(tmp_path / 'image.tar.zst')
    with open(archive, 'wb') as f:
        write_image_archive(src, f)
    with open(archive, 'rb') as f:
        tar = zstd_decompress(f.read())
    framed = tmp_path / 'framed.tar.zst'
    framed.write_bytes(zstd_frames(tar, [1, BLOCK, 700, len(tar) // 3, len(tar) - 1]))
    _extract(str(framed), str(tmp_path / 'ours'))
    _assert_same_members(src, str(tmp_path / 'ours'))
    _assert_same_members(src, extract_with_gnu_tar(str(framed), tmp_path / 'gnu'))


# ---------------------------------------------------------------- (d) determinism

def test_packing_is_deterministic(folders, tmp_path):
    src = folders('many-extents-3000')
    outputs = []
    for name, threads in (('a', 0), ('b', 0), ('one', 1), ('two', 2)):
        path = tmp_path / name
        with open(str(path), 'wb') as f:
            result = write_image_archive(src, f, threads=threads)
        outputs.append((path.read_bytes(), result.digest))
    first = outputs[0]
    for data, digest in outputs[1:]:
        assert digest == first[1]
        assert data == first[0]


def test_packing_does_not_depend_on_file_times(folders, tmp_path):
    src = folders('typical')
    with open(str(tmp_path / 'a'), 'wb') as f:
        first = write_image_archive(src, f)
    for name in MEMBERS:
        os.utime(os.path.join(src, name), (1, 123456789))
    with open(str(tmp_path / 'b'), 'wb') as f:
        second = write_image_archive(src, f)
    assert first.digest == second.digest
    assert (tmp_path / 'a').read_bytes() == (tmp_path / 'b').read_bytes()


# ---------------------------------------------------------------- (e) zero runs stored as data

def test_non_sparse_tar_of_zero_runs_extracts_sparse(tmp_path):
    size = 128 * MIB
    chunks = [(0, pattern(4096, 11)), (70 * MIB + 5, pattern(3000, 12)), (size - 100, pattern(100, 13))]
    src = make_image_folder(str(tmp_path / 'src'), size, chunks)
    archive = gnu_tar_archive(src, tmp_path / 'plain.tar.zst', sparse=False)
    result = _extract(archive, str(tmp_path / 'out'))
    out = str(tmp_path / 'out')
    disk = result.members['disk.img']
    assert disk.sparse_format is None
    assert disk.stored_bytes == size  # every zero was in the archive...
    _assert_same_members(src, out)
    allocated = allocated_bytes(os.path.join(out, 'disk.img'))
    assert allocated <= size // 4, '%d of %d bytes allocated: zero runs were written' % (allocated, size)


# ---------------------------------------------------------------- the oracle itself

def test_same_sparse_content_is_not_vacuous(tmp_path):
    """The comparison used above notices data in one file's hole, a size
    change and a changed byte, and equates holes with written zeros."""
    a = str(tmp_path / 'a')
    b = str(tmp_path / 'b')
    base = [(0, b'abc'), (5 * MIB, pattern(100, 1))]
    make_sparse_file(a, 8 * MIB, base)
    make_sparse_file(b, 8 * MIB, base)
    assert same_sparse_content(a, b)
    make_sparse_file(b, 8 * MIB, base + [(7 * MIB, b'\x01')])  # data where a has a hole
    assert not same_sparse_content(a, b)
    assert not same_sparse_content(b, a)
    make_sparse_file(b, 8 * MIB + 1, base)
    assert not same_sparse_content(a, b)
    make_sparse_file(b, 8 * MIB, [(0, b'abd'), (5 * MIB, pattern(100, 1))])
    assert not same_sparse_content(a, b)
    make_sparse_file(b, 8 * MIB, base + [(6 * MIB, bytes(64 * KIB))])  # allocated zeros == hole
    assert data_bytes_of(b) > data_bytes_of(a)
    assert same_sparse_content(a, b)
