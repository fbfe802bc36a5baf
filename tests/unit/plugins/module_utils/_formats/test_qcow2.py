# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tests for the pure-Python qcow2 inspection.

Every fixture is a real image made by qemu-img (or qemu-io), then patched with
struct where an attack needs bytes qemu-img would never write.  The header
helpers below are written independently of the library so that a bug in the
parser cannot hide itself.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import io
import os
import resource
import shutil
import struct
import subprocess

import pytest

from support.counting_reader import CountingReader

from ansible_collections.vmimage.qemu.plugins.module_utils._formats import qcow2
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    InvalidArchiveError, LimitExceededError, UnsafeImageError, VmImageError,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import ImageLimits, MIB, GIB
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.qcow2 import (
    check_layer, read_qcow2_header,
)

pytestmark = pytest.mark.skipif(shutil.which('qemu-img') is None, reason='qemu-img not installed')

DISK_SIZE = 64 * MIB

EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FDE = 0x0537BE77
EXT_DATA_FILE = 0x44415441


# ---------------------------------------------------------------- fixtures ---

def _no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def qemu_img(*args, **kwargs):
    return subprocess.run(['qemu-img'] + [str(a) for a in args], check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def make_disk(folder, size=DISK_SIZE, name='disk.img'):
    path = folder / name
    with open(path, 'wb') as f:
        f.truncate(size)
    return path


def make_layer(folder, name='layer.qcow2', backing='disk.img', backing_fmt='raw', options=None,
               size=None, disk_size=DISK_SIZE):
    """A layer the way the original packager made one (relative backing name,
    explicit raw backing format, lazy refcounts)."""
    if backing == 'disk.img' and not (folder / 'disk.img').exists():
        make_disk(folder, disk_size)
    options = list(options or [])
    # v2 (compat=0.10) has no lazy refcounts; an explicit choice wins.
    opts = [] if any(o.startswith(('lazy_refcounts', 'compat=0.10')) for o in options) \
        else ['lazy_refcounts=on']
    if backing is not None:
        opts += ['backing_file=%s' % backing, 'backing_fmt=%s' % backing_fmt]
    opts += options
    args = ['create', '-q', '-f', 'qcow2', '-o', ','.join(opts), folder / name]
    if size is not None:
        args.append(size)
    qemu_img(*args, cwd=folder)
    return folder / name


def patch(path, offset, fmt, value):
    with open(path, 'r+b') as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def raw_header(path):
    """Independent reading of the fields the helpers need."""
    with open(path, 'rb') as f:
        data = f.read(2 * MIB)
    version = struct.unpack_from('>I', data, 4)[0]
    cluster_bits = struct.unpack_from('>I', data, 20)[0]
    header_length = 72 if version == 2 else struct.unpack_from('>I', data, 100)[0]
    boff, bsize = struct.unpack_from('>QI', data, 8)
    exts = []
    off = header_length
    end = boff if boff else (1 << cluster_bits)
    while off + 8 <= end:
        etype, elen = struct.unpack_from('>II', data, off)
        if etype == 0:
            break
        exts.append((etype, data[off + 8:off + 8 + elen]))
        off += 8 + ((elen + 7) & ~7)
    backing = data[boff:boff + bsize] if boff else None
    return {'data': data, 'header_length': header_length, 'cluster_size': 1 << cluster_bits,
            'extensions': exts, 'backing': backing}


def rewrite_header_area(path, extensions=None, backing=b'keep'):
    """Rewrite the extension area and the backing name of a real image.

    ``extensions`` is a list of (type, bytes) (None keeps the current ones);
    ``backing`` bytes or None (no backing file); b'keep' keeps it.
    """
    info = raw_header(path)
    exts = info['extensions'] if extensions is None else extensions
    if backing == b'keep':
        backing = info['backing']
    area = b''
    for etype, edata in exts:
        area += struct.pack('>II', etype, len(edata)) + edata + b'\0' * (-len(edata) % 8)
    area += struct.pack('>II', 0, 0)
    start = info['header_length']
    boff = start + len(area) if backing is not None else 0
    with open(path, 'r+b') as f:
        f.seek(start)
        f.write(b'\0' * (info['cluster_size'] - start))
        f.seek(start)
        f.write(area)
        if backing is not None:
            f.write(backing)
        f.seek(8)
        f.write(struct.pack('>QI', boff, len(backing) if backing is not None else 0))


def set_backing(path, name_bytes):
    rewrite_header_area(path, backing=name_bytes)


def set_extensions(path, transform):
    exts = raw_header(path)['extensions']
    rewrite_header_area(path, extensions=transform(exts))


def without(ext_type):
    return lambda exts: [e for e in exts if e[0] != ext_type]


def replace_ext(ext_type, data):
    return lambda exts: [(t, data if t == ext_type else d) for t, d in exts]


def add_ext(ext_type, data):
    return lambda exts: exts + [(ext_type, data)]


def header_of(path, **kwargs):
    return read_qcow2_header(str(path), **kwargs)


def accepted(path, **kwargs):
    return check_layer(header_of(path), **kwargs)


# ------------------------------------------------------------ good images ---

def test_real_layer_is_parsed_field_by_field(tmp_path):
    layer = make_layer(tmp_path)
    h = header_of(layer)
    assert h.magic == b'QFI\xfb'
    assert h.version == 3
    assert h.size == DISK_SIZE
    assert h.cluster_bits == 16 and h.cluster_size == 65536
    assert h.crypt_method == 0
    assert h.backing_file == 'disk.img'
    assert h.backing_format == 'raw'
    assert h.data_file is None
    assert h.nb_snapshots == 0
    assert h.incompatible_features == 0
    assert h.compatible_features == 1  # lazy refcounts
    assert h.autoclear_features == 0
    assert h.refcount_order == 4
    assert h.header_length in (104, 112)
    assert h.header_length % 8 == 0
    assert h.l1_size == 1  # 64 MiB fits in one L2 table of 64 KiB clusters
    assert h.l1_table_offset % 65536 == 0 and h.refcount_table_offset % 65536 == 0
    assert h.file_size == os.path.getsize(layer)
    assert h.backing_file_size == len('disk.img')
    types = [t for t, _d in h.extensions]
    assert types[0] == EXT_BACKING_FORMAT and EXT_FEATURE_NAMES in types
    assert h.feature_names[(0, 0)] == 'dirty bit'
    assert h.feature_names[(1, 0)] == 'lazy refcounts'
    assert h.name == 'layer.qcow2'


def test_real_layer_is_accepted_and_returned(tmp_path):
    layer = make_layer(tmp_path)
    h = header_of(layer)
    assert check_layer(h) is h


@pytest.mark.parametrize('options,size', [
    (['cluster_size=512'], None),
    (['cluster_size=2M'], None),
    (['cluster_size=4096', 'refcount_bits=64'], None),
    (['lazy_refcounts=off'], None),
    (['compat=1.1', 'refcount_bits=1'], None),
    ([], '3G'),  # larger than its backing disk: legitimate growth
])
def test_layer_variants_are_accepted(tmp_path, options, size):
    layer = make_layer(tmp_path, options=options, size=size)
    h = accepted(layer, limits=ImageLimits(max_virtual_size=4 * GIB))
    assert h.backing_file == 'disk.img'


def test_standalone_qcow2_accepted_with_expected_backing_none(tmp_path):
    image = make_layer(tmp_path, name='standalone.qcow2', backing=None, size='16M')
    h = accepted(image, name='standalone.qcow2', expected_backing=None)
    assert h.backing_file is None and h.backing_format is None


def test_layer_with_grown_l1_is_accepted(tmp_path):
    layer = make_layer(tmp_path, size='1M', options=['cluster_size=4096'])
    before = header_of(layer).l1_size
    qemu_img('resize', '-q', '-f', 'qcow2', layer, '64M')
    h = accepted(layer)
    assert h.l1_size > before


def test_v2_image_is_parsed(tmp_path):
    layer = make_layer(tmp_path, options=['compat=0.10'])
    h = header_of(layer)
    assert h.version == 2
    assert h.header_length == 72
    assert h.refcount_order == 4
    assert h.incompatible_features == 0
    assert h.backing_file == 'disk.img' and h.backing_format == 'raw'


def test_file_object_is_read_and_position_restored(tmp_path):
    layer = make_layer(tmp_path)
    data = layer.read_bytes()
    buf = io.BytesIO(data)
    buf.seek(123)
    h = read_qcow2_header(buf, name='layer.qcow2')
    assert buf.tell() == 123
    assert h.backing_file == 'disk.img'
    with open(layer, 'rb') as f:
        assert read_qcow2_header(f).name == 'layer.qcow2'


def test_reads_at_most_the_first_cluster(tmp_path):
    # Metadata preallocation (not allowed with a backing file) makes the file
    # much larger than the one cluster the reader may look at.
    layer = make_layer(tmp_path, backing=None, options=['cluster_size=2M', 'preallocation=metadata'],
                       size='16M')
    data = layer.read_bytes()
    assert len(data) > 4 * MIB
    reader = CountingReader(data)
    read_qcow2_header(reader)
    assert reader.largest_request <= 2 * MIB
    assert reader.bytes_read <= 2 * MIB + 200


def test_absurd_sizes_do_not_cause_reads(tmp_path):
    layer = make_layer(tmp_path)
    patch(layer, 20, '>I', 30)           # 1 GiB clusters
    patch(layer, 36, '>I', 0xFFFFFFFF)   # l1_size
    reader = CountingReader(layer.read_bytes())
    with pytest.raises(InvalidArchiveError, match='cluster_bits 30 out of range 9..21'):
        read_qcow2_header(reader, name='layer.qcow2')
    assert reader.bytes_read <= 200


# ------------------------------------------------- structural validation ---

def _trunc(n):
    def mutate(path):
        with open(path, 'r+b') as f:
            f.truncate(n)
    return mutate


def _p(offset, fmt, value):
    return lambda path: patch(path, offset, fmt, value)


def _both(*mutations):
    def mutate(path):
        for m in mutations:
            m(path)
    return mutate


STRUCTURAL = [
    ('bad-magic', _p(0, '>4s', b'QFI\xfa'), 'bad magic'),
    ('version-1', _p(4, '>I', 1), 'version 1 not supported'),
    ('version-4', _p(4, '>I', 4), 'version 4 not supported'),
    ('cluster-bits-8', _p(20, '>I', 8), 'cluster_bits 8 out of range 9..21'),
    ('cluster-bits-22', _p(20, '>I', 22), 'cluster_bits 22 out of range 9..21'),
    ('cluster-bits-30', _p(20, '>I', 30), 'cluster_bits 30 out of range 9..21'),
    ('header-length-100', _p(100, '>I', 100), 'header_length 100 invalid'),
    ('header-length-108', _p(100, '>I', 108), 'header_length 108 invalid'),
    ('header-length-72', _p(100, '>I', 72), 'header_length 72 invalid'),
    ('header-length-beyond-cluster', _both(_p(20, '>I', 9), _p(100, '>I', 1024)),
     'header_length 1024 exceeds the cluster size 512'),
    ('refcount-order-7', _p(96, '>I', 7), 'refcount_order 7 out of range 0..6'),
    ('backing-size-1024', _p(16, '>I', 1024), 'backing_file_size 1024 exceeds 1023'),
    ('backing-outside-cluster', _p(8, '>Q', 65536 - 4), 'outside the first cluster'),
    ('backing-overlaps-header', _p(8, '>Q', 16), 'backing_file_offset 16 overlaps the header'),
    ('backing-past-eof', _trunc(530), 'past the end of the file'),
    ('backing-not-utf8', lambda p: set_backing(p, b'disk\xff\xfe.img'),
     'backing file name is not valid UTF-8'),
    ('backing-format-not-utf8', lambda p: set_extensions(p, replace_ext(EXT_BACKING_FORMAT, b'r\xffw')),
     'backing format is not valid UTF-8'),
    ('extension-too-long', _p(0x74, '>I', 5000), 'length 5000 runs past the end'),
    ('extension-into-backing-name', _p(0x74, '>I', 500),
     'extension 0xe2792aca length 500 runs past'),
    ('duplicate-backing-format',
     lambda p: set_extensions(p, add_ext(EXT_BACKING_FORMAT, b'raw')),
     'duplicate header extension 0xe2792aca'),
    ('duplicate-unknown-extension',
     lambda p: set_extensions(p, lambda e: e + [(0x1234, b'a'), (0x1234, b'b')]),
     'duplicate header extension 0x00001234'),
    ('backing-format-too-long',
     lambda p: set_extensions(p, replace_ext(EXT_BACKING_FORMAT, b'r' * 20)),
     'backing format extension length 20 out of range'),
    ('backing-format-empty',
     lambda p: set_extensions(p, replace_ext(EXT_BACKING_FORMAT, b'')),
     'backing format extension length 0 out of range'),
    ('feature-table-odd-length',
     lambda p: set_extensions(p, lambda e: [(t, d[:50] if t == EXT_FEATURE_NAMES else d)
                                            for t, d in e]),
     'feature name table length 50 is not a multiple of 48'),
    ('bitmaps-wrong-length', lambda p: set_extensions(p, add_ext(EXT_BITMAPS, b'\0' * 8)),
     'bitmaps extension length 8, expected 24'),
    ('fde-wrong-length', lambda p: set_extensions(p, add_ext(EXT_FDE, b'\0' * 8)),
     'full disk encryption header pointer extension length 8, expected 16'),
    ('empty-data-file-name', lambda p: set_extensions(p, add_ext(EXT_DATA_FILE, b'')),
     'external data file name extension is empty'),
    ('compression-type-without-bit', _p(104, '>B', 1), 'compression_type 1 set without'),
    ('truncated-50', _trunc(50), 'too short for a qcow2 header'),
    ('truncated-v3-90', _trunc(90), 'too short for a qcow2 v3 header'),
    ('empty-file', _trunc(0), 'too short'),
]


@pytest.mark.parametrize('mutate,message', [s[1:] for s in STRUCTURAL],
                         ids=[s[0] for s in STRUCTURAL])
def test_malformed_headers_are_invalid(tmp_path, mutate, message):
    layer = make_layer(tmp_path)
    mutate(layer)
    with pytest.raises(InvalidArchiveError) as err:
        header_of(layer)
    text = str(err.value)
    assert text.startswith('layer.qcow2: ')
    assert message in text


def test_extension_area_without_end_marker_reaching_backing_name_is_accepted(tmp_path):
    # QEMU accepts an extension area that runs right up to the backing name.
    layer = make_layer(tmp_path)
    info = raw_header(layer)
    area = b''
    for etype, edata in info['extensions']:
        area += struct.pack('>II', etype, len(edata)) + edata + b'\0' * (-len(edata) % 8)
    start = info['header_length']
    with open(layer, 'r+b') as f:
        f.seek(start)
        f.write(area + b'disk.img')
        f.seek(8)
        f.write(struct.pack('>QI', start + len(area), 8))
    h = accepted(layer)
    assert h.backing_file == 'disk.img' and h.backing_format == 'raw'


def test_symlink_is_refused_without_reading_the_target(tmp_path):
    layer = make_layer(tmp_path)
    link = tmp_path / 'link.qcow2'
    link.symlink_to(layer)
    with pytest.raises(UnsafeImageError, match='link.qcow2: is a symbolic link'):
        header_of(link)


@pytest.mark.timeout(20)
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / 'layer.qcow2'
    os.mkfifo(fifo)
    with pytest.raises(UnsafeImageError, match='layer.qcow2: is not a regular file'):
        header_of(fifo)


def test_directory_is_refused(tmp_path):
    (tmp_path / 'layer.qcow2').mkdir()
    with pytest.raises(UnsafeImageError, match='not a regular file'):
        header_of(tmp_path / 'layer.qcow2')


# ------------------------------------------------------------ attack matrix ---

def _rebuild_standalone(path):
    """Drop the backing file name and backing format of a real layer."""
    set_extensions(path, without(EXT_BACKING_FORMAT))
    set_backing(path, None)


def _unknown_bit_with_name(path):
    patch(path, 72, '>Q', 1 << 9)
    entry = struct.pack('>BB46s', 0, 9, b'sneaky feature')
    set_extensions(path, lambda e: [(t, d + entry if t == EXT_FEATURE_NAMES else d) for t, d in e])


BACKING_ATTACKS = [
    ('absolute', b'/etc/shadow', "got '/etc/shadow' (absolute path"),
    ('absolute-disk', b'/var/lib/images/disk.img', 'absolute path'),
    ('parent-dir', b'../disk.img', "got '../disk.img' (parent-directory"),
    ('deep-parent', b'a/../../etc/passwd', 'parent-directory reference'),
    ('dot-slash', b'./disk.img', "got './disk.img'"),
    ('subdir', b'sub/disk.img', 'path with directory components'),
    ('json', b'json:{"file":{"driver":"file","filename":"/etc/passwd"}}', 'json: pseudo-protocol'),
    ('nbd-url', b'nbd://attacker.example:10809/export', "protocol prefix 'nbd:'"),
    ('nbd-legacy', b'nbd:localhost:10809', "protocol prefix 'nbd:'"),
    ('http', b'http://attacker.example/disk.img', "protocol prefix 'http:'"),
    ('file-protocol', b'file:disk.img', "protocol prefix 'file:'"),
    ('ssh', b'ssh://root@host/etc/shadow', "protocol prefix 'ssh:'"),
    ('nul', b'disk.img\x00/etc/shadow', 'control characters'),
    ('newline', b'disk.img\n', 'control characters'),
    ('case', b'DISK.IMG', "got 'DISK.IMG'"),
    ('trailing-space', b'disk.img ', "got 'disk.img '"),
    ('empty', b'', "got ''"),
]


@pytest.mark.parametrize('backing,detail', [a[1:] for a in BACKING_ATTACKS],
                         ids=[a[0] for a in BACKING_ATTACKS])
def test_backing_file_must_be_exactly_disk_img(tmp_path, backing, detail):
    layer = make_layer(tmp_path)
    set_backing(layer, backing)
    h = header_of(layer)
    with pytest.raises(UnsafeImageError) as err:
        check_layer(h)
    text = str(err.value)
    assert text.startswith("layer.qcow2: backing file must be exactly 'disk.img', got ")
    assert detail in text


def test_backing_written_by_qemu_img_itself_is_rejected(tmp_path):
    # Not patched: qemu-img happily stores a host path as the backing file.
    make_disk(tmp_path)
    qemu_img('create', '-q', '-f', 'qcow2', '-u', '-b', '/etc/passwd', '-F', 'raw',
             tmp_path / 'layer.qcow2', str(DISK_SIZE))
    with pytest.raises(UnsafeImageError, match="got '/etc/passwd'"):
        accepted(tmp_path / 'layer.qcow2')


ATTACKS = [
    # item 1 (backing) beyond the name itself: the format must be explicit
    ('no-backing', _rebuild_standalone, UnsafeImageError,
     ["has no backing file, expected exactly 'disk.img'"]),
    ('backing-format-missing', lambda p: set_extensions(p, without(EXT_BACKING_FORMAT)),
     UnsafeImageError, ['backing format is missing', 'format confusion']),
    ('backing-format-qcow2', lambda p: set_extensions(p, replace_ext(EXT_BACKING_FORMAT, b'qcow2')),
     UnsafeImageError, ["backing format must be exactly 'raw', got 'qcow2'"]),
    ('backing-format-vmdk', lambda p: set_extensions(p, replace_ext(EXT_BACKING_FORMAT, b'vmdk')),
     UnsafeImageError, ["got 'vmdk'"]),
    ('backing-format-nul', lambda p: set_extensions(p, replace_ext(EXT_BACKING_FORMAT, b'raw\0')),
     UnsafeImageError, ["got 'raw\\x00'"]),
    ('backing-format-RAW', lambda p: set_extensions(p, replace_ext(EXT_BACKING_FORMAT, b'RAW')),
     UnsafeImageError, ["got 'RAW'"]),
    # item 2: external data files
    ('data-file-extension-only', lambda p: set_extensions(p, add_ext(EXT_DATA_FILE, b'/etc/shadow')),
     UnsafeImageError, ["external data file '/etc/shadow' is not allowed (CVE-2024-32498)"]),
    ('data-file-bit-only', _p(72, '>Q', 1 << 2), UnsafeImageError,
     ['external data file (bit 2)', 'CVE-2024-32498']),
    ('data-file-raw-autoclear', _p(88, '>Q', 1 << 1), UnsafeImageError,
     ['raw external data autoclear bit', 'CVE-2024-32498']),
    # item 4: feature bits, encryption, snapshots, sizes
    ('dirty-bit', _p(72, '>Q', 1 << 0), UnsafeImageError, ['incompatible feature bits set: dirty (bit 0)']),
    ('corrupt-bit', _p(72, '>Q', 1 << 1), UnsafeImageError, ['corrupt (bit 1)']),
    ('compression-bit', _both(_p(72, '>Q', 1 << 3), _p(104, '>B', 1)), UnsafeImageError,
     ['compression type (bit 3)']),
    ('extended-l2-bit', _p(72, '>Q', 1 << 4), UnsafeImageError, ['extended L2 (bit 4)']),
    ('unknown-bit-5', _p(72, '>Q', 1 << 5), UnsafeImageError, ['unknown bit 5']),
    ('unknown-bit-63', _p(72, '>Q', 1 << 63), UnsafeImageError, ['unknown bit 63']),
    ('unknown-bit-named-by-image', _unknown_bit_with_name, UnsafeImageError,
     ["unknown bit 9 (the image calls it 'sneaky feature')"]),
    ('dirty-and-corrupt', _p(72, '>Q', 3), UnsafeImageError, ['dirty (bit 0), corrupt (bit 1)']),
    ('crypt-aes-patched', _p(32, '>I', 1), UnsafeImageError, ['encrypted image (crypt_method 1, AES)']),
    ('crypt-luks-patched', _p(32, '>I', 2), UnsafeImageError, ['crypt_method 2, LUKS']),
    ('crypt-unknown', _p(32, '>I', 7), UnsafeImageError, ['crypt_method 7, unknown']),
    ('fde-extension', lambda p: set_extensions(p, add_ext(EXT_FDE, struct.pack('>QQ', 65536, 4096))),
     UnsafeImageError, ['full disk encryption header extension is not allowed']),
    ('snapshots-patched', _p(60, '>I', 3), UnsafeImageError, ['3 internal snapshot(s) present']),
    ('bitmaps-extension', lambda p: set_extensions(p, add_ext(EXT_BITMAPS, b'\0' * 24)),
     UnsafeImageError, ['persistent bitmaps extension is not allowed']),
    ('unknown-extension', lambda p: set_extensions(p, add_ext(0x12345678, b'hello')),
     UnsafeImageError, ['unknown header extension 0x12345678 is not allowed']),
    ('virtual-size-zero', _p(24, '>Q', 0), InvalidArchiveError, ['virtual size is 0']),
    ('virtual-size-huge', _p(24, '>Q', 1 << 62), LimitExceededError,
     ['virtual size 4611686018427387904 bytes exceeds the limit']),
    # structural consistency of the tables (check_layer, not the parser)
    ('l1-offset-zero', _p(40, '>Q', 0), InvalidArchiveError, ['l1_table_offset 0 is not a nonzero multiple']),
    ('l1-offset-misaligned', _p(40, '>Q', 65536 * 3 + 8), InvalidArchiveError,
     ['l1_table_offset 196616 is not a nonzero multiple of the cluster size 65536']),
    ('refcount-offset-zero', _p(48, '>Q', 0), InvalidArchiveError, ['refcount_table_offset 0']),
    ('refcount-offset-misaligned', _p(48, '>Q', 512), InvalidArchiveError, ['refcount_table_offset 512']),
    ('l1-size-zero', _p(36, '>I', 0), InvalidArchiveError, ['l1_size 0 too small for virtual size']),
    ('l1-size-absurd', _p(36, '>I', 0x10000000), InvalidArchiveError, ['l1_size 268435456 is far beyond']),
    ('l1-past-eof', _p(40, '>Q', 1 << 40), InvalidArchiveError, ['L1 table', 'past the end of the file']),
    ('refcount-table-past-eof', _p(48, '>Q', 1 << 40), InvalidArchiveError,
     ['refcount table', 'past the end of the file']),
    ('refcount-clusters-zero', _p(56, '>I', 0), InvalidArchiveError,
     ['refcount_table_clusters 0 out of range']),
    ('refcount-clusters-huge', _p(56, '>I', 100000), InvalidArchiveError,
     ['refcount_table_clusters 100000 out of range']),
]


@pytest.mark.parametrize('mutate,error,fragments', [a[1:] for a in ATTACKS],
                         ids=[a[0] for a in ATTACKS])
def test_attack_matrix(tmp_path, mutate, error, fragments):
    layer = make_layer(tmp_path)
    mutate(layer)
    h = header_of(layer)
    with pytest.raises(error) as err:
        check_layer(h)
    text = str(err.value)
    assert text.startswith('layer.qcow2: ')
    for fragment in fragments:
        assert fragment in text


def test_real_external_data_file_is_rejected(tmp_path):
    make_disk(tmp_path)
    layer = make_layer(tmp_path, options=['data_file=data.raw'])
    h = header_of(layer)
    assert h.data_file == 'data.raw'
    assert h.incompatible_features & (1 << 2)
    with pytest.raises(UnsafeImageError, match=r"external data file 'data.raw' is not allowed "
                                               r"\(CVE-2024-32498\)"):
        check_layer(h)


def test_real_raw_external_data_file_is_rejected_for_standalone(tmp_path):
    image = make_layer(tmp_path, name='img.qcow2', backing=None, size='16M',
                       options=['data_file=/etc/hostname', 'data_file_raw=on'])
    h = header_of(image)
    assert h.autoclear_features & 2
    with pytest.raises(UnsafeImageError, match="external data file '/etc/hostname'"):
        check_layer(h, name='img.qcow2', expected_backing=None)


def test_real_dirty_image_is_rejected(tmp_path):
    # qemu-io aborting after a write leaves a lazy-refcounts image dirty, the
    # way a crashed VM does.
    layer = make_layer(tmp_path)
    proc = subprocess.run(['qemu-io', '-f', 'qcow2', '-c', 'write -P 1 0 64k', '-c', 'abort',
                           str(layer)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=_no_core, cwd=str(tmp_path), check=False)
    assert proc.returncode != 0
    with pytest.raises(UnsafeImageError, match=r'incompatible feature bits set: dirty \(bit 0\)'):
        accepted(layer)


def test_real_snapshot_is_rejected(tmp_path):
    layer = make_layer(tmp_path)
    qemu_img('snapshot', '-c', 'snap1', layer)
    with pytest.raises(UnsafeImageError, match='1 internal snapshot'):
        accepted(layer)


def test_real_bitmap_is_rejected(tmp_path):
    layer = make_layer(tmp_path)
    qemu_img('bitmap', '--add', layer, 'b0')
    with pytest.raises(UnsafeImageError, match='persistent bitmaps'):
        accepted(layer)


def _create_encrypted(path, fmt_option):
    # LUKS key derivation benchmarks the CPU; a short iter-time keeps it fast
    # but may be refused on an idle VM, hence the few attempts.
    for iter_time in (10, 50, 200):
        proc = subprocess.run(
            ['qemu-img', 'create', '-q', '--object', 'secret,id=sec0,data=s3cret', '-f', 'qcow2',
             '-o', 'encrypt.format=%s,encrypt.key-secret=sec0%s'
             % (fmt_option, ',encrypt.iter-time=%d' % iter_time if fmt_option == 'luks' else ''),
             str(path), '16M'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
        if proc.returncode == 0:
            return True
    return False


@pytest.mark.parametrize('fmt,fragment', [('luks', 'crypt_method 2, LUKS'),
                                          ('aes', 'crypt_method 1, AES')])
def test_real_encrypted_images_are_rejected(tmp_path, fmt, fragment):
    image = tmp_path / 'enc.qcow2'
    if not _create_encrypted(image, fmt):
        pytest.skip('qemu-img could not create a %s-encrypted image here' % fmt)
    with pytest.raises(UnsafeImageError, match=r'enc.qcow2: encrypted image \(%s\)'
                       % fragment.replace('(', r'\(')):
        check_layer(header_of(image), name='enc.qcow2', expected_backing=None)


def test_real_v2_image_is_not_accepted(tmp_path):
    layer = make_layer(tmp_path, options=['compat=0.10'])
    with pytest.raises(InvalidArchiveError, match='qcow2 version 2 is not accepted'):
        accepted(layer)


def test_virtual_size_limit_is_applied(tmp_path):
    layer = make_layer(tmp_path)
    limits = ImageLimits(max_virtual_size=DISK_SIZE - 1)
    with pytest.raises(LimitExceededError, match='virtual size %d bytes exceeds the limit of %d'
                       % (DISK_SIZE, DISK_SIZE - 1)):
        accepted(layer, limits=limits)
    assert accepted(layer, limits=ImageLimits(max_virtual_size=DISK_SIZE)).size == DISK_SIZE


def test_virtual_size_beyond_qemu_l1_limit(tmp_path):
    # 512-byte clusters map 32 KiB per L1 entry: 256 TiB needs 8 Gi entries.
    layer = make_layer(tmp_path, options=['cluster_size=512'])
    patch(layer, 24, '>Q', 1 << 48)
    with pytest.raises(InvalidArchiveError, match='more than QEMU supports'):
        accepted(layer, limits=ImageLimits(max_virtual_size=1 << 50))


def test_real_huge_virtual_size_beyond_default_limit(tmp_path):
    # 60 GiB sparse disk and layer: beyond the 50 GiB default, costs nothing.
    layer = make_layer(tmp_path, disk_size=60 * GIB)
    with pytest.raises(LimitExceededError, match='exceeds the limit of %d bytes' % (50 * GIB)):
        accepted(layer)


def test_expected_backing_none_rejects_any_backing(tmp_path):
    layer = make_layer(tmp_path)
    with pytest.raises(UnsafeImageError, match="must have no backing file, got 'disk.img'"):
        accepted(layer, expected_backing=None)
    set_backing(layer, b'/etc/shadow')
    with pytest.raises(UnsafeImageError, match="got '/etc/shadow' \\(absolute path"):
        accepted(layer, expected_backing=None)


def test_backing_format_without_backing_file_is_rejected(tmp_path):
    layer = make_layer(tmp_path)
    set_backing(layer, None)
    with pytest.raises(UnsafeImageError, match="backing format 'raw' given without a backing file"):
        accepted(layer, expected_backing=None)


def test_custom_expected_backing_and_format(tmp_path):
    make_disk(tmp_path, name='base.qcow2')
    qemu_img('create', '-q', '-f', 'qcow2', tmp_path / 'base.qcow2', '16M')
    layer = make_layer(tmp_path, name='child.qcow2', backing='base.qcow2', backing_fmt='qcow2')
    h = accepted(layer, name='child.qcow2', expected_backing='base.qcow2',
                 expected_backing_format='qcow2')
    assert h.backing_format == 'qcow2'
    with pytest.raises(UnsafeImageError, match="child.qcow2: backing file must be exactly 'disk.img'"):
        accepted(layer, name='child.qcow2')


def test_all_errors_are_vmimage_errors():
    for cls in (InvalidArchiveError, UnsafeImageError, LimitExceededError):
        assert issubclass(cls, VmImageError)


def test_describe_backing_risk_plain_name_is_harmless():
    assert qcow2.describe_backing_risk('disk.img') == ''
    assert 'json' in qcow2.describe_backing_risk('json:{}')
