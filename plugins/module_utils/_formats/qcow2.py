# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Pure-Python qcow2 header inspection.

Whether a qcow2 file is safe to hand to QEMU must be decided without QEMU:
``qemu-img info`` itself opens external data files (CVE-2024-4467) and has had
parser bugs, so the first look at an untrusted layer happens here.

``read_qcow2_header`` parses the header and its extensions from the first
cluster only (at most 2 MiB, never a size read from the file) and rejects
anything structurally malformed with InvalidArchiveError.  ``check_layer`` then
applies the acceptance policy of the image cache: qcow2 v3, no encryption, no
incompatible feature bit at all, no external data file, no snapshots, a
bounded virtual size and a backing reference that is exactly the expected
sibling file with an explicit format.  Given the open file it also walks
every table (refcount table -> refcount blocks, L1 -> L2 tables -> data and
compressed clusters), the checks ``qemu-img check`` makes, reading metadata
only.  ``check_layer_file`` does both on one descriptor.  The layout follows
docs/interop/qcow2.rst in QEMU.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re
import struct
from array import array

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    InvalidArchiveError, LimitExceededError, UnsafeImageError,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.format_probe import file_size as probe_file_size
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.format_probe import read_exact_at
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.format_probe import (
    open_regular_file,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import DEFAULT_LIMITS

QCOW2_MAGIC = b'QFI\xfb'

MIN_CLUSTER_BITS = 9
# QEMU cannot open clusters above 2 MiB; this also bounds every read we make.
MAX_CLUSTER_BITS = 21
MAX_READ = 1 << MAX_CLUSTER_BITS
MAX_BACKING_FILE_SIZE = 1023
MAX_REFCOUNT_ORDER = 6
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
# QEMU's implementation limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE).
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
# QEMU's qcow2_validate_table refuses table offsets a signed 64-bit file
# offset cannot reach.
_MAX_FILE_OFFSET = (1 << 63) - 1

# Table entry layout (docs/interop/qcow2.rst; the masks of QEMU's qcow2.h).
_OFLAG_COPIED = 1 << 63
_OFLAG_COMPRESSED = 1 << 62
_L1E_OFFSET_MASK = 0x00fffffffffffe00
_L1E_RESERVED_MASK = 0x7f000000000001ff
_L2E_OFFSET_MASK = 0x00fffffffffffe00
_L2E_STD_RESERVED_MASK = 0x3f000000000001fe
_REFT_OFFSET_MASK = 0xfffffffffffffe00
_REFT_RESERVED_MASK = 0x1ff
_COMPRESSED_SECTOR = 512

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FDE = 0x0537BE77
EXT_DATA_FILE = 0x44415441

EXTENSION_NAMES = {
    EXT_BACKING_FORMAT: 'backing format',
    EXT_FEATURE_NAMES: 'feature name table',
    EXT_BITMAPS: 'bitmaps',
    EXT_FDE: 'full disk encryption header pointer',
    EXT_DATA_FILE: 'external data file name',
}

INCOMPAT_DIRTY = 0
INCOMPAT_CORRUPT = 1
INCOMPAT_DATA_FILE = 2
INCOMPAT_COMPRESSION = 3
INCOMPAT_EXTENDED_L2 = 4
INCOMPATIBLE_FEATURES = {
    INCOMPAT_DIRTY: 'dirty',
    INCOMPAT_CORRUPT: 'corrupt',
    INCOMPAT_DATA_FILE: 'external data file',
    INCOMPAT_COMPRESSION: 'compression type',
    INCOMPAT_EXTENDED_L2: 'extended L2',
}
COMPAT_LAZY_REFCOUNTS = 0
AUTOCLEAR_BITMAPS = 0
AUTOCLEAR_DATA_FILE_RAW = 1

FEATURE_TYPE_INCOMPATIBLE = 0
FEATURE_TYPE_COMPATIBLE = 1
FEATURE_TYPE_AUTOCLEAR = 2

CRYPT_METHODS = {0: 'none', 1: 'AES', 2: 'LUKS'}

# Fixed sizes QEMU itself insists on when it reads these extensions.
_EXT_FIXED_LENGTH = {EXT_BITMAPS: 24, EXT_FDE: 16}
# QEMU keeps the backing format in a 16-byte buffer and refuses longer names.
_MAX_BACKING_FORMAT_LENGTH = 15
_FEATURE_ENTRY = 48

_V2 = struct.Struct('>4sIQIIQIIQQIIQ')
_V3 = struct.Struct('>QQQII')
_EXT_HEAD = struct.Struct('>II')

_PROTOCOL_PREFIX = re.compile(r'^[A-Za-z][A-Za-z0-9+.\-]*:')
_CONTROL_CHARS = re.compile(r'[\x00-\x1f\x7f]')


class Qcow2Header(object):
    """The fields of a qcow2 header plus its parsed extensions.

    Numeric fields carry the names of docs/interop/qcow2.rst.  For version 2
    the v3 fields take the values the spec says to assume (features 0,
    refcount_order 4, header_length 72).  ``extensions`` is the list of
    ``(type, data)`` in file order; ``backing_file``, ``backing_format`` and
    ``data_file`` are decoded strings or None; ``feature_names`` maps
    ``(feature_type, bit)`` to the name the image's own table gives it;
    ``file_size`` is the apparent size of the file; ``name`` labels messages.
    """

    __slots__ = (
        'name', 'file_size',
        'magic', 'version', 'backing_file_offset', 'backing_file_size', 'cluster_bits',
        'size', 'crypt_method', 'l1_size', 'l1_table_offset', 'refcount_table_offset',
        'refcount_table_clusters', 'nb_snapshots', 'snapshots_offset',
        'incompatible_features', 'compatible_features', 'autoclear_features',
        'refcount_order', 'header_length', 'compression_type',
        'extensions', 'backing_file', 'backing_format', 'data_file', 'feature_names',
    )

    def __init__(self, **fields):
        for slot in self.__slots__:
            setattr(self, slot, fields.pop(slot, None))
        if fields:
            raise TypeError('unknown Qcow2Header fields: %s' % ', '.join(sorted(fields)))

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    def extension_types(self):
        return [ext_type for ext_type, _data in self.extensions]

    def _asdict(self):
        return dict((slot, getattr(self, slot)) for slot in self.__slots__)

    def __repr__(self):
        shown = ('version', 'size', 'cluster_bits', 'incompatible_features',
                 'backing_file', 'backing_format', 'data_file', 'nb_snapshots')
        return 'Qcow2Header(%s)' % ', '.join('%s=%r' % (n, getattr(self, n)) for n in shown)


def _fail(name, message):
    return InvalidArchiveError('%s: %s' % (name, message))


def _set_bits(value):
    bits = []
    bit = 0
    while value:
        if value & 1:
            bits.append(bit)
        value >>= 1
        bit += 1
    return bits


def _decode_strict(name, field, raw):
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError as exc:
        raise _fail(name, '%s is not valid UTF-8 (byte %d)' % (field, exc.start))


def _parse_feature_names(data):
    names = {}
    for start in range(0, len(data), _FEATURE_ENTRY):
        entry = data[start:start + _FEATURE_ENTRY]
        feature_name = entry[2:].split(b'\x00', 1)[0]
        # Purely informative text from the image: never trusted, only shown
        # (escaped) in messages, so a lossy decode is fine here.
        names[(entry[0], entry[1])] = feature_name.decode('utf-8', 'backslashreplace')
    return names


def _parse_extensions(name, head, start, end):
    """Parse the extension area [start, end) of ``head``.

    Mirrors qcow2_read_extensions(): the area ends at the backing file name
    (or the end of the first cluster) and a type-0 entry ends it early.
    """
    extensions = []
    seen = set()
    offset = start
    while offset < end:
        if end - offset < _EXT_HEAD.size:
            raise _fail(name, 'header extension at offset %d is truncated' % offset)
        ext_type, ext_len = _EXT_HEAD.unpack_from(head, offset)
        offset += _EXT_HEAD.size
        if ext_type == EXT_END:
            return extensions
        if ext_len > end - offset:
            raise _fail(name, 'header extension 0x%08x length %d runs past the end of the '
                              'header area (%d bytes left)' % (ext_type, ext_len, end - offset))
        if ext_type in seen:
            raise _fail(name, 'duplicate header extension 0x%08x (%s)'
                        % (ext_type, EXTENSION_NAMES.get(ext_type, 'unknown')))
        seen.add(ext_type)
        fixed = _EXT_FIXED_LENGTH.get(ext_type)
        if fixed is not None and ext_len != fixed:
            raise _fail(name, '%s extension length %d, expected %d'
                        % (EXTENSION_NAMES[ext_type], ext_len, fixed))
        if ext_type == EXT_BACKING_FORMAT and not 0 < ext_len <= _MAX_BACKING_FORMAT_LENGTH:
            raise _fail(name, 'backing format extension length %d out of range 1..%d'
                        % (ext_len, _MAX_BACKING_FORMAT_LENGTH))
        if ext_type == EXT_FEATURE_NAMES and ext_len % _FEATURE_ENTRY:
            raise _fail(name, 'feature name table length %d is not a multiple of %d'
                        % (ext_len, _FEATURE_ENTRY))
        if ext_type == EXT_DATA_FILE and ext_len == 0:
            raise _fail(name, 'external data file name extension is empty')
        extensions.append((ext_type, bytes(head[offset:offset + ext_len])))
        # Data is padded to 8 bytes; like QEMU, padding that would run into
        # the backing file name simply ends the area.
        offset += (ext_len + 7) & ~7
    # Reaching the backing file name without an end marker is what QEMU
    # accepts too; running over it is caught by the length checks above.
    return extensions


def read_qcow2_header(path_or_fileobj, name=None):
    """Parse and structurally validate a qcow2 header; return a Qcow2Header.

    ``path_or_fileobj`` is a path (opened without following symlinks, regular
    files only) or a binary file object (its position is restored).  Reads at
    most one cluster (<= 2 MiB).  Malformed input raises InvalidArchiveError
    naming the file and the field; a symlink or special file UnsafeImageError.
    """
    if hasattr(path_or_fileobj, 'read'):
        fileobj = path_or_fileobj
        if name is None:
            label = getattr(fileobj, 'name', None)
            # os.fdopen() objects are named by their descriptor number.
            name = os.path.basename(os.fsdecode(label)) if isinstance(label, (str, bytes)) else ''
            name = name or 'qcow2 image'
        try:
            saved = fileobj.tell()
        except (AttributeError, OSError):
            saved = None
        try:
            return _read_header(fileobj, name)
        finally:
            if saved is not None:
                fileobj.seek(saved)
    if name is None:
        name = os.path.basename(os.fsdecode(path_or_fileobj))
    with open_regular_file(path_or_fileobj, name) as fileobj:
        return _read_header(fileobj, name)


def _read_header(fileobj, name):
    file_size = probe_file_size(fileobj)
    head = read_exact_at(fileobj, 0, min(file_size, V3_MIN_HEADER_LENGTH + 8))
    if len(head) < V2_HEADER_LENGTH:
        raise _fail(name, 'file is %d bytes, too short for a qcow2 header' % len(head))
    (magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
     crypt_method, l1_size, l1_table_offset, refcount_table_offset,
     refcount_table_clusters, nb_snapshots, snapshots_offset) = _V2.unpack_from(head, 0)
    if magic != QCOW2_MAGIC:
        raise _fail(name, 'bad magic %r, not a qcow2 image' % magic)
    if version not in (2, 3):
        raise _fail(name, 'version %d not supported (2 or 3)' % version)
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _fail(name, 'cluster_bits %d out of range %d..%d'
                    % (cluster_bits, MIN_CLUSTER_BITS, MAX_CLUSTER_BITS))
    cluster_size = 1 << cluster_bits

    if version == 2:
        incompatible = compatible = autoclear = 0
        refcount_order = 4
        header_length = V2_HEADER_LENGTH
        compression_type = 0
    else:
        if len(head) < V3_MIN_HEADER_LENGTH:
            raise _fail(name, 'file is %d bytes, too short for a qcow2 v3 header' % len(head))
        (incompatible, compatible, autoclear, refcount_order,
         header_length) = _V3.unpack_from(head, V2_HEADER_LENGTH)
        if header_length < V3_MIN_HEADER_LENGTH or header_length % 8:
            raise _fail(name, 'header_length %d invalid (v3 needs >= %d and a multiple of 8)'
                        % (header_length, V3_MIN_HEADER_LENGTH))
        if refcount_order > MAX_REFCOUNT_ORDER:
            raise _fail(name, 'refcount_order %d out of range 0..%d'
                        % (refcount_order, MAX_REFCOUNT_ORDER))
        compression_type = 0
    if header_length > cluster_size:
        raise _fail(name, 'header_length %d exceeds the cluster size %d'
                    % (header_length, cluster_size))

    # Everything else lives in the first cluster; the file may be shorter
    # (then whatever is past its end is simply missing).
    limit = min(cluster_size, file_size)
    head = read_exact_at(fileobj, 0, limit)
    if len(head) < limit:
        raise _fail(name, 'short read: %d of %d header bytes' % (len(head), limit))
    if header_length > limit:
        raise _fail(name, 'header_length %d runs past the end of the file (%d bytes)'
                    % (header_length, file_size))
    if version == 3 and header_length > V3_MIN_HEADER_LENGTH:
        compression_type = head[V3_MIN_HEADER_LENGTH]
    if compression_type and not incompatible & (1 << INCOMPAT_COMPRESSION):
        raise _fail(name, 'compression_type %d set without the compression type feature bit'
                    % compression_type)

    backing_file = None
    if backing_file_offset:
        if backing_file_size > MAX_BACKING_FILE_SIZE:
            raise _fail(name, 'backing_file_size %d exceeds %d'
                        % (backing_file_size, MAX_BACKING_FILE_SIZE))
        if backing_file_offset < header_length:
            raise _fail(name, 'backing_file_offset %d overlaps the header (%d bytes)'
                        % (backing_file_offset, header_length))
        if backing_file_offset + backing_file_size > cluster_size:
            raise _fail(name, 'backing_file_offset %d + backing_file_size %d lies outside '
                              'the first cluster (%d bytes)'
                        % (backing_file_offset, backing_file_size, cluster_size))
        if backing_file_offset + backing_file_size > file_size:
            raise _fail(name, 'backing_file_offset %d + backing_file_size %d lies past the '
                              'end of the file (%d bytes)'
                        % (backing_file_offset, backing_file_size, file_size))
        raw = head[backing_file_offset:backing_file_offset + backing_file_size]
        backing_file = _decode_strict(name, 'backing file name', raw)
        ext_end = backing_file_offset
    else:
        ext_end = limit

    extensions = _parse_extensions(name, head, header_length, ext_end)
    by_type = dict(extensions)
    backing_format = None
    if EXT_BACKING_FORMAT in by_type:
        backing_format = _decode_strict(name, 'backing format', by_type[EXT_BACKING_FORMAT])
    data_file = None
    if EXT_DATA_FILE in by_type:
        # Always rejected by check_layer; decoded leniently so the message can
        # show the name instead of failing on its encoding.
        data_file = by_type[EXT_DATA_FILE].decode('utf-8', 'backslashreplace')
    feature_names = _parse_feature_names(by_type.get(EXT_FEATURE_NAMES, b''))

    return Qcow2Header(
        name=name, file_size=file_size, magic=magic, version=version,
        backing_file_offset=backing_file_offset, backing_file_size=backing_file_size,
        cluster_bits=cluster_bits, size=size, crypt_method=crypt_method, l1_size=l1_size,
        l1_table_offset=l1_table_offset, refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters, nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset, incompatible_features=incompatible,
        compatible_features=compatible, autoclear_features=autoclear,
        refcount_order=refcount_order, header_length=header_length,
        compression_type=compression_type, extensions=extensions, backing_file=backing_file,
        backing_format=backing_format, data_file=data_file, feature_names=feature_names,
    )


def describe_backing_risk(backing):
    """Say in words why a backing reference is dangerous ('' when it is a
    plain sibling file name)."""
    if _CONTROL_CHARS.search(backing):
        return 'contains control characters'
    if backing.startswith('json:'):
        return 'json: pseudo-protocol, QEMU would parse it as options'
    if backing.startswith('/'):
        return 'absolute path to a host file'
    match = _PROTOCOL_PREFIX.match(backing)
    if match:
        return 'protocol prefix %r, QEMU would open it as a network or driver URL' % match.group(0)
    parts = backing.split('/')
    if '..' in parts:
        return 'parent-directory reference escapes the image folder'
    if len(parts) > 1:
        return 'path with directory components'
    return ''


def _feature_label(header, bit):
    known = INCOMPATIBLE_FEATURES.get(bit)
    if known is not None:
        return '%s (bit %d)' % (known, bit)
    claimed = header.feature_names.get((FEATURE_TYPE_INCOMPATIBLE, bit))
    if claimed:
        return 'unknown bit %d (the image calls it %r)' % (bit, claimed)
    return 'unknown bit %d' % bit


def _needed_l1_entries(size, cluster_bits):
    # Each L1 entry maps one L2 table: a cluster of 8-byte entries, i.e.
    # 2^(2*cluster_bits - 3) bytes of guest data.
    span = 1 << (2 * cluster_bits - 3)
    return (size + span - 1) // span


def check_layer(header, limits=DEFAULT_LIMITS, name='layer.qcow2',
                expected_backing='disk.img', expected_backing_format='raw', fileobj=None):
    """Apply the acceptance policy to a parsed header and return it.

    Policy and security violations raise UnsafeImageError, a virtual size over
    limits.max_virtual_size LimitExceededError, and structural inconsistencies
    (version 2, misplaced tables, zero size) InvalidArchiveError.  With
    ``expected_backing=None`` the image must have no backing file at all.
    ``fileobj``, the open file the header was read from, adds the table walk
    (``walk_tables``); without it only the header is judged, so validating a
    layer from outside goes through ``check_layer_file``.
    """
    # Extensions first: they say most precisely what the image is trying.
    ext_types = header.extension_types()
    if header.crypt_method:
        raise UnsafeImageError('%s: encrypted image (crypt_method %d, %s) is not allowed'
                               % (name, header.crypt_method,
                                  CRYPT_METHODS.get(header.crypt_method, 'unknown')))
    if EXT_FDE in ext_types:
        raise UnsafeImageError('%s: full disk encryption header extension is not allowed'
                               % name)
    if header.data_file is not None:
        raise UnsafeImageError("%s: external data file %r is not allowed (CVE-2024-32498)"
                               % (name, header.data_file))
    if header.incompatible_features:
        labels = [_feature_label(header, bit) for bit in _set_bits(header.incompatible_features)]
        hint = ''
        if header.incompatible_features & (1 << INCOMPAT_DATA_FILE):
            hint = ' (external data files: CVE-2024-32498)'
        raise UnsafeImageError('%s: incompatible feature bits set: %s%s'
                               % (name, ', '.join(labels), hint))
    if header.autoclear_features & (1 << AUTOCLEAR_DATA_FILE_RAW):
        raise UnsafeImageError('%s: raw external data autoclear bit (bit 1) is set: external '
                               'data files are not allowed (CVE-2024-32498)' % name)
    if header.version != 3:
        raise InvalidArchiveError('%s: qcow2 version %d is not accepted, version 3 is required'
                                  % (name, header.version))
    if header.nb_snapshots:
        raise UnsafeImageError('%s: %d internal snapshot(s) present; snapshots are not allowed'
                               % (name, header.nb_snapshots))
    for ext_type in ext_types:
        if ext_type == EXT_BITMAPS:
            raise UnsafeImageError('%s: persistent bitmaps extension is not allowed' % name)
        if ext_type not in (EXT_BACKING_FORMAT, EXT_FEATURE_NAMES):
            raise UnsafeImageError('%s: unknown header extension 0x%08x is not allowed'
                                   % (name, ext_type))

    if header.size == 0:
        raise InvalidArchiveError('%s: virtual size is 0' % name)
    if header.size > limits.max_virtual_size:
        raise LimitExceededError('%s: virtual size %d bytes exceeds the limit of %d bytes'
                                 % (name, header.size, limits.max_virtual_size))
    _check_tables(header, name)
    _check_backing(header, name, expected_backing, expected_backing_format)
    if fileobj is not None:
        walk_tables(fileobj, header, name)
    return header


def check_layer_file(path_or_fileobj, limits=DEFAULT_LIMITS, name=None,
                     expected_backing='disk.img', expected_backing_format='raw'):
    """Read a layer's header, apply ``check_layer`` and walk its tables, all
    through one open file (a path is opened like ``read_qcow2_header`` does);
    return the header.

    One descriptor for both steps means the tables judged are the ones of the
    file whose header was judged.
    """
    if hasattr(path_or_fileobj, 'read'):
        header = read_qcow2_header(path_or_fileobj, name=name)
        return check_layer(header, limits=limits, name=header.name, expected_backing=expected_backing,
                           expected_backing_format=expected_backing_format, fileobj=path_or_fileobj)
    if name is None:
        name = os.path.basename(os.fsdecode(path_or_fileobj))
    with open_regular_file(path_or_fileobj, name) as fileobj:
        header = _read_header(fileobj, name)
        return check_layer(header, limits=limits, name=name, expected_backing=expected_backing,
                           expected_backing_format=expected_backing_format, fileobj=fileobj)


def _check_tables(header, name):
    cluster_size = header.cluster_size
    file_size = header.file_size
    for field in ('l1_table_offset', 'refcount_table_offset'):
        offset = getattr(header, field)
        if offset == 0 or offset % cluster_size:
            raise InvalidArchiveError('%s: %s %d is not a nonzero multiple of the cluster size %d'
                                      % (name, field, offset, cluster_size))
    needed = _needed_l1_entries(header.size, header.cluster_bits)
    if needed > MAX_L1_BYTES // 8:
        raise InvalidArchiveError('%s: virtual size %d needs %d L1 entries with %d-byte clusters, '
                                  'more than QEMU supports (%d)'
                                  % (name, header.size, needed, cluster_size, MAX_L1_BYTES // 8))
    if header.l1_size < needed:
        raise InvalidArchiveError('%s: l1_size %d too small for virtual size %d (needs %d)'
                                  % (name, header.l1_size, header.size, needed))
    # QEMU grows L1 by 1.5x at a time, so twice the need (or one extra
    # cluster of entries for tiny disks) is the most an honest image has.
    most = min(max(2 * needed, needed + cluster_size // 8), MAX_L1_BYTES // 8)
    if header.l1_size > most:
        raise InvalidArchiveError('%s: l1_size %d is far beyond the %d entries virtual size %d '
                                  'needs' % (name, header.l1_size, needed, header.size))
    if file_size is not None and header.l1_table_offset + 8 * header.l1_size > file_size:
        raise InvalidArchiveError('%s: L1 table (offset %d, %d entries) lies past the end of '
                                  'the file (%d bytes)'
                                  % (name, header.l1_table_offset, header.l1_size, file_size))
    reftable_bytes = header.refcount_table_clusters * cluster_size
    if header.refcount_table_clusters == 0 or reftable_bytes > MAX_REFTABLE_BYTES:
        raise InvalidArchiveError('%s: refcount_table_clusters %d out of range (1..%d clusters)'
                                  % (name, header.refcount_table_clusters,
                                     MAX_REFTABLE_BYTES // cluster_size))
    if file_size is not None and header.refcount_table_offset + reftable_bytes > file_size:
        raise InvalidArchiveError('%s: refcount table (offset %d, %d clusters) lies past the '
                                  'end of the file (%d bytes)'
                                  % (name, header.refcount_table_offset,
                                     header.refcount_table_clusters, file_size))
    # QEMU validates the place of the snapshot table even when it holds no
    # snapshot (qcow2_validate_table) and refuses to open the image otherwise.
    if header.snapshots_offset % cluster_size:
        raise InvalidArchiveError('%s: snapshots_offset 0x%x is not a multiple of the cluster size %d '
                                  '(QEMU refuses to open the image)'
                                  % (name, header.snapshots_offset, cluster_size))
    if header.snapshots_offset > _MAX_FILE_OFFSET:
        raise InvalidArchiveError('%s: snapshots_offset 0x%x is beyond any file offset '
                                  '(QEMU refuses to open the image)' % (name, header.snapshots_offset))


def _check_backing(header, name, expected_backing, expected_format):
    backing = header.backing_file
    fmt = header.backing_format
    if expected_backing is None:
        if backing is not None:
            risk = describe_backing_risk(backing)
            raise UnsafeImageError('%s: must have no backing file, got %r%s'
                                   % (name, backing, ' (%s)' % risk if risk else ''))
        if fmt is not None:
            raise UnsafeImageError('%s: backing format %r given without a backing file'
                                   % (name, fmt))
        return
    if backing is None:
        raise UnsafeImageError('%s: has no backing file, expected exactly %r'
                               % (name, expected_backing))
    if backing != expected_backing:
        risk = describe_backing_risk(backing)
        raise UnsafeImageError('%s: backing file must be exactly %r, got %r%s'
                               % (name, expected_backing, backing,
                                  ' (%s)' % risk if risk else ''))
    if fmt is None:
        raise UnsafeImageError('%s: backing format is missing; it must be exactly %r, otherwise '
                               'QEMU would probe %r (format confusion)'
                               % (name, expected_format, expected_backing))
    if fmt != expected_format:
        raise UnsafeImageError('%s: backing format must be exactly %r, got %r'
                               % (name, expected_format, fmt))


# ------------------------------------------------------------ table walk ---

# What a cluster of the file is used for, as _ClusterMap stores it.
_KIND_HEADER = 1
_KIND_L1 = 2
_KIND_REFTABLE = 3
_KIND_REFBLOCK = 4
_KIND_L2 = 5
_KIND_DATA = 6
# Several compressed clusters may share one host cluster, so from here up the
# value counts them (16 is one reference); 255 means "see the overflow dict".
_KIND_COMPRESSED = 16
_COUNT_OVERFLOW = 255

_KIND_NAMES = {
    _KIND_HEADER: 'the header cluster',
    _KIND_L1: 'the L1 table',
    _KIND_REFTABLE: 'the refcount table',
    _KIND_REFBLOCK: 'a refcount block',
    _KIND_L2: 'an L2 table',
    _KIND_DATA: 'a data cluster',
}
_KIND_CLASH = {
    _KIND_HEADER: 'inside the header cluster',
    _KIND_L1: 'inside the L1 table',
    _KIND_REFTABLE: 'inside the refcount table',
    _KIND_REFBLOCK: 'inside a refcount block',
    _KIND_L2: 'already used as an L2 table (a second reference)',
    _KIND_DATA: 'already used as a data cluster (a second reference)',
}
_COMPRESSED_CLASH = 'already used for compressed data'
_NONZERO_RUN = re.compile(b'[^\\x00]+')
_REFCOUNT_FORMATS = {3: '>B', 4: '>H', 5: '>I', 6: '>Q'}


def _kind_name(value):
    return _KIND_NAMES.get(value, 'compressed data')


def _clash(value):
    return _KIND_CLASH.get(value, _COMPRESSED_CLASH)


class _ClusterMap(object):
    """One byte per cluster of the file saying what the tables use it for
    (0: nothing).

    Chunks are allocated only where some entry points, and every entry must
    point inside the file, so memory stays below one byte per cluster of the
    file whatever the tables claim.
    """

    _BITS = 16
    _MASK = (1 << _BITS) - 1

    __slots__ = ('_chunks', '_counts')

    def __init__(self):
        self._chunks = {}
        self._counts = {}

    def get(self, index):
        chunk = self._chunks.get(index >> self._BITS)
        return 0 if chunk is None else chunk[index & self._MASK]

    def set(self, index, value):
        key = index >> self._BITS
        chunk = self._chunks.get(key)
        if chunk is None:
            chunk = self._chunks[key] = bytearray(1 << self._BITS)
        chunk[index & self._MASK] = value

    def add_compressed(self, index):
        """Count one more compressed cluster in ``index``; return the previous
        value when the cluster is in use for something else (else 0)."""
        value = self.get(index)
        if value == 0:
            self.set(index, _KIND_COMPRESSED)
        elif value < _KIND_COMPRESSED:
            return value
        elif value < _COUNT_OVERFLOW - 1:
            self.set(index, value + 1)
        elif value == _COUNT_OVERFLOW - 1:
            self.set(index, _COUNT_OVERFLOW)
            self._counts[index] = _COUNT_OVERFLOW - _KIND_COMPRESSED + 1
        else:
            self._counts[index] += 1
        return 0

    def references(self, index, value):
        if value < _KIND_COMPRESSED:
            return 1
        if value < _COUNT_OVERFLOW:
            return value - _KIND_COMPRESSED + 1
        return self._counts[index]

    def used(self):
        """Yield ``(index, value)`` for every used cluster, in file order."""
        for key in sorted(self._chunks):
            chunk = self._chunks[key]
            base = key << self._BITS
            for run in _NONZERO_RUN.finditer(chunk):
                for i in range(run.start(), run.end()):
                    yield base + i, chunk[i]


def _refcount_at(block, entry, refcount_order):
    fmt = _REFCOUNT_FORMATS.get(refcount_order)
    if fmt is not None:
        return struct.unpack_from(fmt, block, entry << (refcount_order - 3))[0]
    # Narrow refcounts are packed least significant bits first
    # (get_refcount_ro0..2 in QEMU's qcow2-refcount.c).
    per_byte_bits = 3 - refcount_order
    shift = (entry & ((1 << per_byte_bits) - 1)) << refcount_order
    return (block[entry >> per_byte_bits] >> shift) & ((1 << (1 << refcount_order)) - 1)


def walk_tables(fileobj, header, name=None):
    """Check every table of a qcow2 image the way ``qemu-img check`` does.

    The refcount table's entries must point at refcount blocks, the L1
    table's at L2 tables and the L2 tables' at data clusters or compressed
    data; every such pointer must be free of reserved bits, cluster aligned
    (compressed data excepted), inside the file and not point at the header,
    the L1 table, the refcount table, a refcount block, an L2 table or another
    entry's cluster (without snapshots nothing may be shared except a host
    cluster packing several compressed clusters).  Each cluster so used must
    have a refcount at least its number of users, otherwise QEMU would
    allocate over it on the next write.  An L1 entry beyond the virtual size
    must be empty: QEMU never fills one, and it bounds the walk.

    Only tables are read, each cluster at most once and never more than one
    cluster at a time; data clusters are never read.  ``header`` must be one
    ``check_layer`` accepted for this very file (offsets, sizes, no
    snapshots).  Failures raise InvalidArchiveError naming the table, its
    offset, the entry and where it points.  The file position is restored.
    """
    name = name or header.name
    try:
        saved = fileobj.tell()
    except (AttributeError, OSError):
        saved = None
    try:
        _TableWalk(fileobj, header, name).run()
    finally:
        if saved is not None:
            fileobj.seek(saved)


class _TableWalk(object):

    def __init__(self, fileobj, header, name):
        self.fileobj = fileobj
        self.header = header
        self.name = name
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.file_size = header.file_size if header.file_size is not None else probe_file_size(fileobj)
        self.clusters = _ClusterMap()
        self.refblocks = {}

    def fail(self, message):
        return InvalidArchiveError('%s: %s' % (self.name, message))

    def run(self):
        header = self.header
        self.claim_region('header', 0, self.cluster_size, _KIND_HEADER)
        self.claim_region('L1 table', header.l1_table_offset, 8 * header.l1_size, _KIND_L1)
        self.claim_region('refcount table', header.refcount_table_offset,
                          header.refcount_table_clusters * self.cluster_size, _KIND_REFTABLE)
        self.walk_reftable()
        for index, offset in self.walk_l1():
            self.walk_l2(index, offset)
        self.check_refcounts()

    def claim_region(self, label, offset, length, kind):
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        for index in range(first, last + 1):
            current = self.clusters.get(index)
            if current:
                raise self.fail('%s at 0x%x (%d bytes) overlaps %s at 0x%x'
                                % (label, offset, length, _kind_name(current), index << self.cluster_bits))
            self.clusters.set(index, kind)

    def claim_cluster(self, table, table_offset, entry, offset, kind):
        if offset & (self.cluster_size - 1):
            raise self.fail('%s at 0x%x, entry %d points at 0x%x, not aligned to the cluster size %d'
                            % (table, table_offset, entry, offset, self.cluster_size))
        if offset >= self.file_size:
            raise self.fail('%s at 0x%x, entry %d points at 0x%x, beyond the end of the file (0x%x bytes)'
                            % (table, table_offset, entry, offset, self.file_size))
        index = offset >> self.cluster_bits
        current = self.clusters.get(index)
        if current:
            raise self.fail('%s at 0x%x, entry %d points at 0x%x, %s'
                            % (table, table_offset, entry, offset, _clash(current)))
        self.clusters.set(index, kind)

    def read_table(self, offset, length):
        """Yield ``(entry index, value)`` of the nonzero 64-bit entries of the
        table at ``offset``, reading at most MAX_READ bytes at a time.  Bytes
        past the end of the file read as zeros, as QEMU reads them."""
        done = 0
        while done < length:
            size = min(MAX_READ, length - done)
            data = read_exact_at(self.fileobj, offset + done, size)
            if len(data) < size:
                data += bytes(size - len(data))
            base = done // 8
            values = struct.unpack('>%dQ' % (size // 8), data)
            for i, value in enumerate(values):
                if value:
                    yield base + i, value
            done += size

    def walk_reftable(self):
        offset = self.header.refcount_table_offset
        length = self.header.refcount_table_clusters * self.cluster_size
        for index, entry in self.read_table(offset, length):
            if entry & _REFT_RESERVED_MASK:
                raise self.fail('refcount table at 0x%x, entry %d has reserved bits set (0x%016x)'
                                % (offset, index, entry))
            block = entry & _REFT_OFFSET_MASK
            self.claim_cluster('refcount table', offset, index, block, _KIND_REFBLOCK)
            self.refblocks[index] = block

    def walk_l1(self):
        """Claim the L2 tables; return (L1 index, offset) pairs in L1 order."""
        header = self.header
        offset = header.l1_table_offset
        needed = _needed_l1_entries(header.size, self.cluster_bits)
        indexes = array('L')
        tables = array('Q')
        for index, entry in self.read_table(offset, 8 * header.l1_size):
            if entry & _L1E_RESERVED_MASK:
                raise self.fail('L1 table at 0x%x, entry %d has reserved bits set (0x%016x)'
                                % (offset, index, entry))
            l2_offset = entry & _L1E_OFFSET_MASK
            if not l2_offset:
                continue
            if index >= needed:
                raise self.fail('L1 table at 0x%x, entry %d points at 0x%x, but the entry maps guest '
                                'offsets beyond the virtual size %d'
                                % (offset, index, l2_offset, header.size))
            self.claim_cluster('L1 table', offset, index, l2_offset, _KIND_L2)
            indexes.append(index)
            tables.append(l2_offset)
        return zip(indexes, tables)

    def walk_l2(self, l1_index, offset):
        cluster_bits = self.cluster_bits
        # Compressed descriptors: the host offset in the low 62 - (cluster_bits
        # - 8) bits, then the number of additional 512-byte sectors.
        csize_shift = 62 - (cluster_bits - 8)
        csize_mask = (1 << (cluster_bits - 8)) - 1
        coffset_mask = (1 << csize_shift) - 1
        last_cluster = (self.file_size - 1) >> cluster_bits
        for index, entry in self.read_table(offset, self.cluster_size):
            if entry & _OFLAG_COMPRESSED:
                if entry & _OFLAG_COPIED:
                    raise self.fail('L2 table at 0x%x, entry %d describes compressed data with the '
                                    'copied flag set (0x%016x)' % (offset, index, entry))
                coffset = entry & coffset_mask
                sectors = ((entry >> csize_shift) & csize_mask) + 1
                length = sectors * _COMPRESSED_SECTOR - (coffset & (_COMPRESSED_SECTOR - 1))
                first = coffset >> cluster_bits
                last = (coffset + length - 1) >> cluster_bits
                if last > last_cluster:
                    raise self.fail('L2 table at 0x%x, entry %d points at 0x%x (compressed, %d bytes), '
                                    'beyond the end of the file (0x%x bytes)'
                                    % (offset, index, coffset, length, self.file_size))
                for cluster in range(first, last + 1):
                    current = self.clusters.add_compressed(cluster)
                    if current:
                        raise self.fail('L2 table at 0x%x, entry %d points at 0x%x (compressed, %d bytes), %s'
                                        % (offset, index, coffset, length, _clash(current)))
                continue
            if entry & _L2E_STD_RESERVED_MASK:
                raise self.fail('L2 table at 0x%x, entry %d has reserved bits set (0x%016x)'
                                % (offset, index, entry))
            data_offset = entry & _L2E_OFFSET_MASK
            if data_offset:
                self.claim_cluster('L2 table', offset, index, data_offset, _KIND_DATA)

    def check_refcounts(self):
        header = self.header
        order = header.refcount_order
        # A refcount block holds cluster_size * 8 / 2^order entries.
        block_bits = self.cluster_bits + 3 - order
        block_mask = (1 << block_bits) - 1
        reftable_entries = header.refcount_table_clusters * self.cluster_size // 8
        current = None
        block = None
        for index, value in self.clusters.used():
            table_index = index >> block_bits
            if table_index != current:
                current = table_index
                block_offset = self.refblocks.get(table_index)
                block = None
                if block_offset is not None:
                    block = read_exact_at(self.fileobj, block_offset, self.cluster_size)
                    block += bytes(self.cluster_size - len(block))
            offset = index << self.cluster_bits
            users = self.clusters.references(index, value)
            if block is None:
                if table_index >= reftable_entries:
                    where = 'has no entry %d' % table_index
                else:
                    where = 'entry %d is empty' % table_index
                raise self.fail('refcount table at 0x%x, %s: the cluster at 0x%x (%s) has refcount 0, '
                                'QEMU would allocate over it'
                                % (header.refcount_table_offset, where, offset, _kind_name(value)))
            refcount = _refcount_at(block, index & block_mask, order)
            if refcount >= users:
                continue
            if value < _KIND_COMPRESSED:
                raise self.fail('refcount block at 0x%x, entry %d: the cluster at 0x%x (%s) has refcount 0, '
                                'QEMU would allocate over it'
                                % (block_offset, index & block_mask, offset, _kind_name(value)))
            raise self.fail('refcount block at 0x%x, entry %d: the cluster at 0x%x holds compressed data '
                            'of %d clusters but has refcount %d, QEMU would free it while in use'
                            % (block_offset, index & block_mask, offset, users, refcount))
