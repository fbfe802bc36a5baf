# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tests for the format-confusion guard (REFERENCE section 4, item 3).

Images of every format qemu-img can create are made with qemu-img itself; the
read-only formats (bochs, cloop, dmg) and odd variants are built from their
published signatures.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import io
import os
import random
import shutil
import struct
import subprocess

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    LimitExceededError, UnsafeImageError,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.format_probe import (
    HEAD_SIZE, TAIL_SIZE, check_raw_disk, detect_image_signature,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import ImageLimits, MIB, GIB

needs_qemu_img = pytest.mark.skipif(shutil.which('qemu-img') is None,
                                    reason='qemu-img not installed')


def qemu_img(*args):
    return subprocess.run(['qemu-img'] + [str(a) for a in args], check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def write_file(path, data=b'', size=None, at_end=None):
    """Write ``data`` at offset 0, extend sparsely to ``size`` and put
    ``at_end`` so that it ends ``at_end[1]`` bytes before the end."""
    with open(path, 'wb') as f:
        f.write(data)
        if size is not None:
            f.truncate(size)
        if at_end is not None:
            blob, from_end = at_end
            f.seek((size if size is not None else len(data)) - from_end)
            f.write(blob)
    return path


# Formats qemu-img can create: (format, create options, expected probe name)
CREATED = [
    ('qcow2', [], 'qcow2'),
    ('qcow2-v2', ['-o', 'compat=0.10'], 'qcow2'),
    ('qcow', [], 'qcow'),
    ('qed', [], 'qed'),
    ('vmdk', [], 'vmdk'),
    ('vmdk-stream', ['-o', 'subformat=streamOptimized'], 'vmdk'),
    ('vmdk-flat-descriptor', ['-o', 'subformat=monolithicFlat'], 'vmdk'),
    ('vmdk-2gb-descriptor', ['-o', 'subformat=twoGbMaxExtentSparse'], 'vmdk'),
    ('vdi', [], 'vdi'),
    ('vpc', [], 'vpc'),
    ('vpc-fixed', ['-o', 'subformat=fixed'], 'vpc'),
    ('vhdx', [], 'vhdx'),
    ('parallels', [], 'parallels'),
    ('luks', ['--object', 'secret,id=sec0,data=s3cret', '-o', 'key-secret=sec0,iter-time=10'],
     'luks'),
]


def _create(tmp_path, fmt_id, options):
    fmt = fmt_id.split('-')[0]
    path = tmp_path / 'disk.img'
    # LUKS key derivation benchmarks the CPU and can refuse a very short
    # iter-time on a loaded or idle VM: try a few before giving up.
    attempts = [options] if fmt != 'luks' else [
        [o.replace('iter-time=10', 'iter-time=%d' % t) for o in options] for t in (10, 50, 200)]
    for opts in attempts:
        proc = subprocess.run(['qemu-img', 'create', '-q', '-f', fmt] + opts + [str(path), '16M'],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
        if proc.returncode == 0:
            return path
    if fmt == 'luks':
        pytest.skip('qemu-img could not create a LUKS image here: %s' % proc.stderr)
    raise AssertionError(proc.stderr)


@needs_qemu_img
@pytest.mark.parametrize('fmt_id,options,expected', CREATED, ids=[c[0] for c in CREATED])
def test_images_made_by_qemu_img_are_recognised(tmp_path, fmt_id, options, expected):
    path = _create(tmp_path, fmt_id, options)
    assert detect_image_signature(str(path)) == expected
    with pytest.raises(UnsafeImageError) as err:
        check_raw_disk(str(path))
    assert str(err.value) == 'disk.img: looks like a %s image, not raw (format confusion)' % expected


CLOOP = b'#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n'

HANDMADE = [
    ('bochs', lambda p: write_file(p, b'Bochs Virtual HD Image\0' + b'Redolog\0' + b'Growing\0', 1 * MIB),
     'bochs'),
    ('cloop', lambda p: write_file(p, CLOOP, 1 * MIB), 'cloop'),
    ('dmg-koly-trailer', lambda p: write_file(p, b'', 4 * MIB, (b'koly' + b'\0\0\0\x04', 512)), 'dmg'),
    ('vmdk3-cowd', lambda p: write_file(p, b'COWD' + struct.pack('<I', 1), 1 * MIB), 'vmdk'),
    ('vmdk4-kdmv', lambda p: write_file(p, b'KDMV' + struct.pack('<I', 1), 1 * MIB), 'vmdk'),
    ('vmdk-descriptor-extent-to-host-file',
     lambda p: write_file(p, b'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                             b'createType="monolithicFlat"\nRW 32768 FLAT "/etc/shadow" 0\n', 1 * MIB),
     'vmdk'),
    ('vmdk-descriptor-qemu-probe-comments', lambda p: write_file(p, b'# hi\n#x\n   \nversion=2\n'), 'vmdk'),
    ('vmdk-descriptor-crlf', lambda p: write_file(p, b'   \r\nversion=3\r\nfoo'), 'vmdk'),
    ('vmdk-descriptor-late-in-head',
     lambda p: write_file(p, b'\0' * 3000 + b'# Disk DescriptorFile\n', 1 * MIB), 'vmdk'),
    ('qcow2-version-0', lambda p: write_file(p, b'QFI\xfb\0\0\0\0', 1 * MIB), 'qcow2'),
    ('qcow2-version-99', lambda p: write_file(p, b'QFI\xfb\0\0\0\x63', 1 * MIB), 'qcow2'),
    ('vdi-signature', lambda p: write_file(p, b'\0' * 0x40 + struct.pack('<I', 0xbeda107f), 1 * MIB),
     'vdi'),
    ('vhd-dynamic-header-copy-only', lambda p: write_file(p, b'conectix' + b'\0\0\0\x02', 1 * MIB), 'vpc'),
    ('vhd-511-byte-footer', lambda p: write_file(p, b'', 2 * MIB, (b'conectix', 511)), 'vpc'),
    ('vhd-fixed-footer-on-sparse-40g', lambda p: write_file(p, b'', 40 * GIB, (b'conectix', 512)),
     'vpc'),
    ('luks2-magic', lambda p: write_file(p, b'LUKS\xba\xbe\0\x02', 1 * MIB), 'luks'),
    ('parallels-old-magic', lambda p: write_file(p, b'WithoutFreeSpace' + struct.pack('<I', 2), 1 * MIB),
     'parallels'),
    ('qed-on-tiny-file', lambda p: write_file(p, b'QED\0'), 'qed'),
]


@pytest.mark.parametrize('make,expected', [h[1:] for h in HANDMADE], ids=[h[0] for h in HANDMADE])
def test_handmade_signatures_are_recognised(tmp_path, make, expected):
    path = make(tmp_path / 'disk.img')
    assert detect_image_signature(str(path)) == expected
    with pytest.raises(UnsafeImageError, match=r'^disk.img: looks like a %s image, not raw '
                                               r'\(format confusion\)$' % expected):
        check_raw_disk(str(path))


def _mbr():
    sector = bytearray(512)
    sector[0:3] = b'\xeb\x63\x90'
    sector[446:462] = b'\x80\x00\x02\x00\x83\xfe\xff\xff\x00\x08\x00\x00\x00\xf8\xff\x00'
    sector[510:512] = b'\x55\xaa'
    return bytes(sector)


def _ext4_superblock():
    data = bytearray(4096)
    struct.pack_into('<H', data, 1024 + 0x38, 0xEF53)
    return bytes(data)


RAW = [
    ('sparse-zeros', lambda p: write_file(p, b'', 1 * GIB)),
    ('empty', lambda p: write_file(p, b'')),
    ('tiny', lambda p: write_file(p, b'abc')),
    ('mbr', lambda p: write_file(p, _mbr(), 8 * MIB)),
    ('ext4', lambda p: write_file(p, _ext4_superblock(), 8 * MIB)),
    ('random', lambda p: write_file(p, random.Random(20240711).randbytes(1 * MIB))),
    ('text', lambda p: write_file(p, b'hello world\n' * 1000)),
    ('comment-then-other', lambda p: write_file(p, b'# a comment\nname=value\n')),
    ('vmdk-version-4', lambda p: write_file(p, b'version=4\n')),
    ('blank-line-before-version', lambda p: write_file(p, b'\nversion=1\n')),
    ('conectix-not-at-start', lambda p: write_file(p, b'\0' * 8 + b'conectix', 1 * MIB)),
    ('conectix-not-at-footer', lambda p: write_file(p, b'', 1 * MIB, (b'conectix', 700))),
    ('koly-not-at-trailer', lambda p: write_file(p, b'', 1 * MIB, (b'koly', 1000))),
    ('vdi-signature-wrong-offset', lambda p: write_file(p, b'\0' * 0x44 + struct.pack('<I', 0xbeda107f))),
    ('qcow-magic-at-sector-1', lambda p: write_file(p, b'\0' * 512 + b'QFI\xfb\0\0\0\x03', 1 * MIB)),
    ('descriptor-beyond-head', lambda p: write_file(p, b'\0' * HEAD_SIZE + b'# Disk DescriptorFile\n')),
]


@pytest.mark.parametrize('make', [r[1] for r in RAW], ids=[r[0] for r in RAW])
def test_raw_disks_are_accepted(tmp_path, make):
    path = make(tmp_path / 'disk.img')
    assert detect_image_signature(str(path)) is None
    assert check_raw_disk(str(path)) == os.path.getsize(path)


@needs_qemu_img
def test_qcow2_disguised_as_raw_with_host_backing_is_refused(tmp_path):
    # The CVE-2008-2004 shape: disk.img is a qcow2 whose backing file is a host
    # file; anything probing it would read /etc/shadow into the guest.
    path = tmp_path / 'disk.img'
    qemu_img('create', '-q', '-f', 'qcow2', '-u', '-b', '/etc/shadow', '-F', 'raw', path, '1G')
    with pytest.raises(UnsafeImageError, match=r'disk.img: looks like a qcow2 image, not raw '
                                               r'\(format confusion\)'):
        check_raw_disk(str(path))


def test_apparent_size_limit(tmp_path):
    path = write_file(tmp_path / 'disk.img', b'', 2 * MIB)
    with pytest.raises(LimitExceededError, match=r'disk.img: apparent size 2097152 bytes exceeds '
                                                 r'the limit of 1048576 bytes'):
        check_raw_disk(str(path), limits=ImageLimits(max_member_size=1 * MIB))
    assert check_raw_disk(str(path), limits=ImageLimits(max_member_size=2 * MIB)) == 2 * MIB


def test_name_is_used_in_messages(tmp_path):
    path = write_file(tmp_path / 'x', b'QED\0', 1 * MIB)
    with pytest.raises(UnsafeImageError, match='^base.raw: looks like a qed image'):
        check_raw_disk(str(path), name='base.raw')


class _CountingReader(io.RawIOBase):
    """A 'file' of ``size`` bytes that is all zeros but for a few blobs, and
    counts what is read from it: reading must not depend on the size."""

    def __init__(self, size, blobs):
        self.size = size
        self.blobs = blobs
        self.pos = 0
        self.bytes_read = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def read(self, n=-1):
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        out = bytearray(max(0, end - self.pos))
        for offset, blob in self.blobs:
            for i, b in enumerate(blob):
                if self.pos <= offset + i < end:
                    out[offset + i - self.pos] = b
        self.pos = end
        self.bytes_read += len(out)
        return bytes(out)


def test_reading_is_bounded_for_huge_files():
    size = 1 << 50  # 1 PiB: nothing proportional to it may be read
    reader = _CountingReader(size, [(size - 512, b'koly')])
    reader.seek(77)
    assert detect_image_signature(reader) == 'dmg'
    assert reader.bytes_read <= HEAD_SIZE + TAIL_SIZE
    assert reader.tell() == 77  # position restored


def test_sparse_file_probe_is_cheap(tmp_path):
    path = write_file(tmp_path / 'disk.img', b'', 200 * GIB)
    assert detect_image_signature(str(path)) is None
    assert os.stat(path).st_blocks == 0  # still sparse: nothing was written


def test_symlink_is_refused(tmp_path):
    target = write_file(tmp_path / 'real.img', b'', 1 * MIB)
    link = tmp_path / 'disk.img'
    link.symlink_to(target)
    with pytest.raises(UnsafeImageError, match='disk.img: is a symbolic link'):
        check_raw_disk(str(link))


@pytest.mark.timeout(20)
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / 'disk.img'
    os.mkfifo(fifo)
    with pytest.raises(UnsafeImageError, match='disk.img: is not a regular file'):
        check_raw_disk(str(fifo))


def test_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        check_raw_disk(str(tmp_path / 'disk.img'))
