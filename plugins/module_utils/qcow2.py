# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
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
sibling file with an explicit format.  The layout follows
docs/interop/qcow2.rst in QEMU.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re
import struct

from ansible_collections.vmimage.qemu.plugins.module_utils.errors import (
    InvalidArchiveError, LimitExceededError, UnsafeImageError,
)
from ansible_collections.vmimage.qemu.plugins.module_utils.format_probe import file_size as probe_file_size
from ansible_collections.vmimage.qemu.plugins.module_utils.format_probe import read_exact_at
from ansible_collections.vmimage.qemu.plugins.module_utils.format_probe import (
    open_regular_file,
)
from ansible_collections.vmimage.qemu.plugins.module_utils.limits import DEFAULT_LIMITS

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
                expected_backing='disk.img', expected_backing_format='raw'):
    """Apply the acceptance policy to a parsed header and return it.

    Policy and security violations raise UnsafeImageError, a virtual size over
    limits.max_virtual_size LimitExceededError, and structural inconsistencies
    (version 2, misplaced tables, zero size) InvalidArchiveError.  With
    ``expected_backing=None`` the image must have no backing file at all.
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
    return header


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
