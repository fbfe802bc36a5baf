# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""The tar header formats an image archive may use, read strictly and written
deterministically.

Python's tarfile is not used: it cannot write sparse members, does not
validate sparse maps, and resolves names and links in ways an extractor of
untrusted input must not.  Only what GNU tar writes for regular and sparse
files (ustar, old GNU 'S' sparse, POSIX pax with GNU sparse 0.0, 0.1, 1.0) is
understood; everything else is refused by the reader.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import struct

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import InvalidArchiveError

BLOCK = 512

# Type flags, named for error messages.
TYPE_NAMES = {
    b'0': 'regular file', b'\0': 'regular file', b'1': 'hard link', b'2': 'symbolic link',
    b'3': 'character device', b'4': 'block device', b'5': 'directory', b'6': 'FIFO',
    b'7': 'contiguous file', b'g': 'pax global header', b'x': 'pax header',
    b'L': 'GNU long name', b'K': 'GNU long link name', b'S': 'GNU sparse file',
    b'D': 'GNU directory dump', b'M': 'GNU multi-volume continuation', b'V': 'GNU volume label',
}

# Bounds that keep a crafted header from making the reader allocate or loop.
MAX_PAX_HEADER = 1024 * 1024
MAX_NUMBER_DIGITS = 20


def type_name(flag):
    return TYPE_NAMES.get(flag, 'unknown type %r' % flag)


def parse_number(field, what):
    """Parse a numeric tar field: NUL/space terminated octal, or GNU base-256."""
    if field[:1] in (b'\x80', b'\xff'):
        if field[:1] == b'\xff':
            raise InvalidArchiveError('tar header: negative %s' % what)
        value = 0
        for byte in bytearray(field[1:]):
            value = (value << 8) | byte
        return value
    text = field.replace(b'\0', b' ').strip(b' ')
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in bytearray(text)):
        raise InvalidArchiveError('tar header: %s is not an octal number: %r' % (what, field[:24]))
    return int(text, 8)


def parse_decimal(text, what):
    """Parse a non-negative decimal from pax/sparse text: digits only, bounded length."""
    if isinstance(text, bytes):
        try:
            text = text.decode('ascii')
        except UnicodeDecodeError:
            raise InvalidArchiveError('%s is not a decimal number' % what)
    if not text or len(text) > MAX_NUMBER_DIGITS or not text.isdigit() or not text.isascii():
        raise InvalidArchiveError('%s is not a non-negative decimal number: %r' % (what, text[:24]))
    return int(text)


def _checksum_ok(block):
    stored = parse_number(block[148:156], 'checksum')
    patched = block[:148] + b' ' * 8 + block[156:]
    unsigned = sum(bytearray(patched))
    if stored == unsigned:
        return True
    # Some historic tars summed signed chars; GNU tar accepts both.
    signed = sum(b - 256 if b > 127 else b for b in bytearray(patched))
    return stored == signed


class TarHeader(object):
    """One 512-byte header block, decoded."""

    __slots__ = ('raw', 'name', 'typeflag', 'size', 'mode', 'mtime', 'linkname', 'magic',
                 'is_gnu', 'sparse_entries', 'sparse_extended', 'sparse_realsize')

    @classmethod
    def parse(cls, block):
        if len(block) != BLOCK:
            raise InvalidArchiveError('tar archive is truncated inside a header')
        if not _checksum_ok(block):
            raise InvalidArchiveError('tar header checksum mismatch: not a tar archive, or corrupted')
        self = cls()
        self.raw = block
        self.typeflag = block[156:157]
        self.magic = block[257:265]
        self.is_gnu = self.magic == b'ustar  \0'
        name = block[0:100].split(b'\0', 1)[0]
        if self.magic[:6] == b'ustar\0':
            prefix = block[345:500].split(b'\0', 1)[0]
            if prefix:
                name = prefix + b'/' + name
        self.name = name
        self.linkname = block[157:257].split(b'\0', 1)[0]
        self.size = parse_number(block[124:136], 'size')
        self.mode = parse_number(block[100:108], 'mode')
        self.mtime = parse_number(block[136:148], 'mtime')
        self.sparse_entries = None
        self.sparse_extended = False
        self.sparse_realsize = None
        if self.typeflag == b'S':
            if not self.is_gnu:
                raise InvalidArchiveError('GNU sparse header without GNU magic')
            self.sparse_entries = parse_old_gnu_sparse_entries(block[386:482], 4)
            self.sparse_extended = block[482] != 0
            self.sparse_realsize = parse_number(block[483:495], 'sparse real size')
        return self


def parse_old_gnu_sparse_entries(area, count):
    """Decode ``count`` (offset, numbytes) pairs of 12-byte numbers; an entry
    whose offset field is empty ends the list."""
    entries = []
    for i in range(count):
        off_field = area[i * 24:i * 24 + 12]
        len_field = area[i * 24 + 12:i * 24 + 24]
        if off_field[:1] == b'\0':
            break
        entries.append((parse_number(off_field, 'sparse offset'), parse_number(len_field, 'sparse length')))
    return entries


def parse_pax_records(data):
    """Decode pax extended header records ``"<len> <key>=<value>\\n"`` in order.

    Order matters: GNU sparse 0.0 repeats GNU.sparse.offset/numbytes, so a dict
    would lose the map.  Values stay bytes; keys are ASCII.
    """
    records = []
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos:pos + 1] == b'\0':
            # tar pads the header to a block with NULs; only padding may follow.
            if data[pos:].strip(b'\0'):
                raise InvalidArchiveError('pax header: data after padding')
            break
        space = data.find(b' ', pos, pos + MAX_NUMBER_DIGITS + 1)
        if space < 0:
            raise InvalidArchiveError('pax header: malformed record length')
        length = parse_decimal(data[pos:space], 'pax record length')
        if length < 5 or pos + length > end or data[pos + length - 1:pos + length] != b'\n':
            raise InvalidArchiveError('pax header: record length %d does not fit the header' % length)
        record = data[space + 1:pos + length - 1]
        eq = record.find(b'=')
        if eq <= 0:
            raise InvalidArchiveError('pax header: record without key')
        try:
            key = record[:eq].decode('ascii')
        except UnicodeDecodeError:
            raise InvalidArchiveError('pax header: non-ASCII key')
        records.append((key, record[eq + 1:]))
        pos += length
    return records


# ---------------------------------------------------------------- writing

def _octal(value, width):
    """Octal field with NUL terminator; the caller guarantees it fits."""
    text = ('%0*o' % (width - 1, value)).encode('ascii')
    if len(text) > width - 1:
        raise ValueError('value %d does not fit a %d-byte tar field' % (value, width))
    return text + b'\0'


def build_ustar_header(name, size, mode=0o644, mtime=0, typeflag=b'0'):
    """A POSIX ustar header with fixed owner (0/0, no names): deterministic."""
    if isinstance(name, str):
        name = name.encode('utf-8')
    if len(name) > 100:
        raise ValueError('tar member name too long: %r' % name)
    header = bytearray(BLOCK)
    header[0:len(name)] = name
    header[100:108] = _octal(mode, 8)
    header[108:116] = _octal(0, 8)
    header[116:124] = _octal(0, 8)
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(mtime, 12)
    header[156:157] = typeflag
    header[257:265] = b'ustar\x0000'
    header[329:337] = _octal(0, 8)
    header[337:345] = _octal(0, 8)
    header[148:156] = b' ' * 8
    checksum = sum(header)
    header[148:156] = ('%06o' % checksum).encode('ascii') + b'\0 '
    return bytes(header)


def pax_record(key, value):
    """One pax record; its length prefix counts itself."""
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str):
        value = value.encode('utf-8')
    body = b' ' + key.encode('ascii') + b'=' + value + b'\n'
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode('ascii') + body


def padding(size):
    return b'\0' * (-size % BLOCK)


def pack_header_block(header):
    return struct.pack('512s', header)
