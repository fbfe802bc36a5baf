# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Extracting an untrusted ``image.tar.zst`` into a private staging folder.

The archive is streamed: zstd decompresses in a worker thread while the main
thread parses tar headers and ``pwrite``s data at its extent offsets, so the
whole tar never exists on disk and memory stays bounded by a few buffers.
Every limit is enforced while bytes flow, before anything is written past it.
The compressed input must end where a zstd frame ends: the decoder would take
a stream cut inside a frame (even one lacking only its checksum) for a
complete one, so frame boundaries are followed as the input is read.

Member names are only compared against the three allowed names; the file
names used on disk are the library's own constants, opened relative to the
staging folder with O_NOFOLLOW|O_EXCL, so no archive content ever becomes a
path.  Links, devices, directories, unknown or duplicate members are refused.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import queue
import threading

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    InvalidArchiveError, LimitExceededError, UnsafeImageError, VmImageError,
)
# DISK and LAYER are re-exported for the mutable image code.
from ansible_collections.vmimage.qemu.plugins.module_utils._core.layout import (  # pylint: disable=unused-import
    DISK, LAYER, MACHINE, MEMBER_NAMES,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import DEFAULT_LIMITS
from ansible_collections.vmimage.qemu.plugins.module_utils._core.writeback import WriteBehind
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.tar_format import (
    BLOCK, TarHeader, parse_decimal, parse_old_gnu_sparse_entries, parse_pax_records, type_name,
    MAX_PAX_HEADER,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.zstd_codec import ZstdFrameTracker, zstd_module


DECOMPRESS_BUFFER = 4 * 1024 * 1024
DECOMPRESS_BUFFERS = 4
# tar pads archives to a record (10 KiB by default); more than this much
# trailing data, even zeros, is not something tar writes.
MAX_TRAILING_BYTES = 1024 * 1024
_ZEROS = bytes(DECOMPRESS_BUFFER)
_ZEROS_VIEW = memoryview(_ZEROS)


class ExtractedMember(object):
    """Facts about one extracted member, for reports and tests."""

    __slots__ = ('name', 'size', 'stored_bytes', 'sparse_format', 'extents')

    def __init__(self, name, size, stored_bytes, sparse_format, extents):
        self.name = name
        self.size = size
        self.stored_bytes = stored_bytes
        self.sparse_format = sparse_format
        self.extents = extents

    def __repr__(self):
        return 'ExtractedMember(%r, size=%d, stored=%d, sparse=%r)' % (
            self.name, self.size, self.stored_bytes, self.sparse_format)


class ExtractResult(object):
    __slots__ = ('folder', 'members', 'compressed_bytes', 'decompressed_bytes')

    def __init__(self, folder, members, compressed_bytes, decompressed_bytes):
        self.folder = folder
        self.members = members
        self.compressed_bytes = compressed_bytes
        self.decompressed_bytes = decompressed_bytes


def _describe_name(raw):
    """A printable, bounded rendering of an untrusted member name."""
    text = raw.decode('utf-8', 'backslashreplace')
    if len(text) > 80:
        text = text[:77] + '...'
    return repr(text)


def _check_member_name(raw):
    """Map an archive name to one of the allowed names, or refuse it.

    A leading ``./`` is accepted because ``tar -C dir -cf - ./disk.img``
    writes it; nothing else is normalised.
    """
    name = raw[2:] if raw.startswith(b'./') else raw
    for allowed in MEMBER_NAMES:
        if name == allowed.encode('ascii'):
            return allowed
    shown = _describe_name(raw)
    if raw.startswith(b'/'):
        raise UnsafeImageError('archive member %s has an absolute path (path traversal)' % shown)
    if b'..' in raw.split(b'/'):
        raise UnsafeImageError('archive member %s contains ".." (path traversal)' % shown)
    if b'\0' in raw or b'\\' in raw:
        raise UnsafeImageError('archive member %s has a suspicious name' % shown)
    raise InvalidArchiveError('unexpected archive member %s: an image holds exactly %s'
                              % (shown, ', '.join(MEMBER_NAMES)))


class _CountingSource(object):
    """Counts compressed bytes, stops at the compressed-size limit and
    follows zstd frame boundaries, so the end of the input can be checked."""

    def __init__(self, src, limit):
        self._src = src
        self._limit = limit
        self.count = 0
        self.frames = ZstdFrameTracker()
        self.eof = False

    def read(self, size=-1):
        data = self._src.read(size)
        self.count += len(data)
        if self._limit is not None and self.count > self._limit:
            raise LimitExceededError('compressed archive exceeds the limit of %d bytes' % self._limit)
        if data:
            self.frames.feed(data)
        elif size:
            self.eof = True
        return data

    def check_end(self):
        """Called when the decoder reports the end of its output."""
        if not self.eof:
            raise InvalidArchiveError('the zstd decoder stopped before the end of the input (%d bytes read)'
                                      % self.count)
        self.frames.check_complete()


class _DecompressedStream(object):
    """zstd decompression in a worker thread, consumed as a byte stream.

    Buffers cycle between a free queue and a full queue, so memory is bounded
    by DECOMPRESS_BUFFERS * DECOMPRESS_BUFFER whatever the archive holds.
    """

    def __init__(self, src, limits):
        zstd = zstd_module()
        self._zstd = zstd
        self._source = _CountingSource(src, limits.max_compressed_bytes)
        self._window_limit = limits.max_window_size
        dctx = zstd.ZstdDecompressor(max_window_size=limits.max_window_size)
        self._reader = dctx.stream_reader(self._source, read_size=1024 * 1024,
                                          read_across_frames=True, closefd=False)
        self._free = queue.Queue()
        self._full = queue.Queue()
        for _buffer in range(DECOMPRESS_BUFFERS):
            self._free.put(bytearray(DECOMPRESS_BUFFER))
        self._stop = False
        self._buf = None
        self._len = 0
        self._pos = 0
        self._eof = False
        self.total = 0
        self._thread = threading.Thread(target=self._run, name='zstd-decompress')
        self._thread.daemon = True
        self._thread.start()

    @property
    def compressed_bytes(self):
        return self._source.count

    def _run(self):
        try:
            while True:
                buf = self._free.get()
                if buf is None or self._stop:
                    return
                n = self._reader.readinto(buf)
                if n == 0:
                    # The reader ends quietly on input that stops inside a
                    # frame, even one lacking only its checksum.
                    self._source.check_end()
                    self._full.put((None, 0, None))
                    return
                self._full.put((buf, n, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._full.put((None, 0, exc))

    def _translate(self, exc):
        if isinstance(exc, VmImageError):
            return exc
        text = str(exc)
        if isinstance(exc, self._zstd.ZstdError):
            lowered = text.lower()
            if 'window' in lowered or 'memory' in lowered:
                return LimitExceededError('zstd frame needs a window larger than the limit of %d bytes (%s)'
                                          % (self._window_limit, text))
            return InvalidArchiveError('not a valid zstd stream: %s' % text)
        return exc

    def _advance(self):
        if self._buf is not None:
            self._free.put(self._buf)
            self._buf = None
        if self._eof:
            return False
        buf, n, exc = self._full.get()
        if exc is not None:
            self._eof = True
            raised = self._translate(exc)
            raise raised
        if buf is None:
            self._eof = True
            return False
        self._buf, self._len, self._pos = buf, n, 0
        self.total += n
        return True

    def chunks(self, size):
        """Yield memoryviews covering the next ``size`` bytes; each view is
        valid only until the next one is requested."""
        remaining = size
        while remaining > 0:
            if self._buf is None or self._pos >= self._len:
                if not self._advance():
                    raise InvalidArchiveError('archive is truncated')
            take = min(remaining, self._len - self._pos)
            start = self._pos
            self._pos += take
            remaining -= take
            yield self._buf, start, take

    def read_exact(self, size):
        parts = []
        for buf, start, take in self.chunks(size):
            parts.append(bytes(buf[start:start + take]))
        return b''.join(parts)

    def skip(self, size):
        for _chunk in self.chunks(size):
            pass

    def at_eof(self):
        if self._buf is not None and self._pos < self._len:
            return False
        return not self._advance()

    def close(self):
        self._stop = True
        if self._buf is not None:
            self._free.put(self._buf)
            self._buf = None
        self._free.put(None)
        # Drain so the worker is never blocked handing over a buffer.
        self._thread.join(timeout=0.05)
        while self._thread.is_alive():
            try:
                item = self._full.get(timeout=0.5)
            except queue.Empty:
                continue
            if item[0] is not None:
                self._free.put(item[0])
                self._free.put(None)
        try:
            self._reader.close()
        except Exception:
            pass


class _SparseMapBuilder(object):
    """Collects and validates one member's sparse map."""

    def __init__(self, name, realsize, limits):
        self.name = name
        self.realsize = realsize
        self.limits = limits
        self.entries = []
        self._end = 0

    def add(self, offset, length):
        if len(self.entries) >= self.limits.max_sparse_extents:
            raise LimitExceededError('%s: sparse map has more than %d entries'
                                     % (self.name, self.limits.max_sparse_extents))
        if offset < self._end:
            raise UnsafeImageError('%s: sparse map entries overlap or are out of order (offset %d < %d)'
                                   % (self.name, offset, self._end))
        if offset + length > self.realsize:
            raise UnsafeImageError('%s: sparse map entry %d+%d lies beyond the file size %d'
                                   % (self.name, offset, length, self.realsize))
        self.entries.append((offset, length))
        self._end = offset + length

    def data_bytes(self):
        return sum(length for _offset, length in self.entries)


class _ImageTarExtractor(object):
    """The tar state machine: one pass, strict, writing into ``folder``."""

    def __init__(self, stream, folder_fd, limits, fsync):
        self.stream = stream
        self.folder_fd = folder_fd
        self.limits = limits
        self.fsync = fsync
        self.members = {}
        self.written = 0

    def run(self):
        pax = None
        while True:
            block = self.stream.read_exact(BLOCK) if not self.stream.at_eof() else None
            if block is None:
                raise InvalidArchiveError('archive is truncated: no end-of-archive marker')
            if block == _ZEROS[:BLOCK]:
                if pax is not None:
                    raise InvalidArchiveError('pax header without a member before the end of the archive')
                self._finish_trailer()
                break
            header = TarHeader.parse(block)
            flag = header.typeflag
            if flag == b'x':
                if pax is not None:
                    raise InvalidArchiveError('two pax headers in a row')
                pax = self._read_pax(header)
                continue
            if flag in (b'0', b'\0', b'S'):
                self._extract_member(header, pax or [])
                pax = None
                continue
            shown = _describe_name(header.name)
            if flag in (b'1', b'2'):
                raise UnsafeImageError('archive member %s is a %s to %s: links are not allowed'
                                       % (shown, type_name(flag), _describe_name(header.linkname)))
            if flag in (b'3', b'4', b'5', b'6'):
                raise UnsafeImageError('archive member %s is a %s: only regular files are allowed'
                                       % (shown, type_name(flag)))
            raise InvalidArchiveError('archive member %s has unsupported type %s'
                                      % (shown, type_name(flag)))
        missing = [n for n in MEMBER_NAMES if n not in self.members]
        if missing:
            raise InvalidArchiveError('archive lacks %s' % ', '.join(missing))
        return self.members

    def _finish_trailer(self):
        # The second end-of-archive block and record padding: zeros only.
        seen = 0
        while not self.stream.at_eof():
            for buf, start, take in self.stream.chunks(min(BLOCK, MAX_TRAILING_BYTES)):
                if buf[start:start + take] != _ZEROS[:take]:
                    raise InvalidArchiveError('data after the end of the tar archive')
                seen += take
            if seen > MAX_TRAILING_BYTES:
                raise InvalidArchiveError('more than %d bytes after the end of the tar archive'
                                          % MAX_TRAILING_BYTES)

    def _read_pax(self, header):
        if header.size > MAX_PAX_HEADER:
            raise LimitExceededError('pax header of %d bytes exceeds the limit of %d'
                                     % (header.size, MAX_PAX_HEADER))
        data = self.stream.read_exact(header.size)
        self.stream.skip(-header.size % BLOCK)
        return parse_pax_records(data)

    def _extract_member(self, header, pax):
        name_raw = header.name
        size = header.size
        sparse_format = None
        sparse_keys = {}
        sparse_pairs = []
        for key, value in pax:
            if key == 'path':
                name_raw = value
            elif key == 'size':
                size = parse_decimal(value, 'pax size')
            elif key in ('GNU.sparse.offset', 'GNU.sparse.numbytes'):
                sparse_pairs.append((key, value))
            elif key.startswith('GNU.sparse.'):
                sparse_keys[key] = value
        if 'GNU.sparse.name' in sparse_keys:
            name_raw = sparse_keys['GNU.sparse.name']
        name = _check_member_name(name_raw)
        if name in self.members:
            raise UnsafeImageError('archive holds %s twice (duplicate member)' % name)

        if header.typeflag == b'S':
            sparse_format = 'gnu'
            realsize = header.sparse_realsize
        elif 'GNU.sparse.major' in sparse_keys or 'GNU.sparse.minor' in sparse_keys:
            major = sparse_keys.get('GNU.sparse.major', b'')
            minor = sparse_keys.get('GNU.sparse.minor', b'')
            if (major, minor) != (b'1', b'0'):
                raise InvalidArchiveError('%s: unsupported GNU sparse format %s.%s'
                                          % (name, major.decode('ascii', 'replace'),
                                             minor.decode('ascii', 'replace')))
            sparse_format = 'pax-1.0'
            realsize = parse_decimal(sparse_keys.get('GNU.sparse.realsize', b''), '%s: GNU.sparse.realsize' % name)
        elif 'GNU.sparse.map' in sparse_keys:
            sparse_format = 'pax-0.1'
            realsize = parse_decimal(sparse_keys.get('GNU.sparse.size', b''), '%s: GNU.sparse.size' % name)
        elif sparse_pairs or 'GNU.sparse.size' in sparse_keys:
            sparse_format = 'pax-0.0'
            realsize = parse_decimal(sparse_keys.get('GNU.sparse.size', b''), '%s: GNU.sparse.size' % name)
        else:
            realsize = size

        limit = self.limits.max_machine_json if name == MACHINE else self.limits.max_member_size
        if realsize > limit:
            raise LimitExceededError('%s: size %d exceeds the limit of %d bytes' % (name, realsize, limit))
        if size > limit + 64 * 1024 * 1024 and sparse_format is None:
            raise LimitExceededError('%s: stored size %d exceeds the limit' % (name, size))

        sparse = None
        map_bytes = 0
        if sparse_format is not None:
            sparse = _SparseMapBuilder(name, realsize, self.limits)
            if sparse_format == 'gnu':
                self._old_gnu_map(header, sparse)
            elif sparse_format == 'pax-0.1':
                self._pax01_map(sparse_keys, sparse)
            elif sparse_format == 'pax-0.0':
                self._pax00_map(sparse_keys, sparse_pairs, sparse)
            else:
                map_bytes = self._pax10_map(size, sparse)
            data_size = size - map_bytes
            if sparse.data_bytes() != data_size:
                raise UnsafeImageError('%s: sparse map describes %d bytes of data but the member stores %d'
                                       % (name, sparse.data_bytes(), data_size))
            entries = sparse.entries
        else:
            data_size = size
            entries = [(0, size)] if size else []

        if self.written + data_size > self.limits.max_written_bytes:
            raise LimitExceededError('archive would write more than %d bytes in total'
                                     % self.limits.max_written_bytes)
        self.written += data_size
        self._write_member(name, realsize, entries)
        self.stream.skip(-size % BLOCK)
        self.members[name] = ExtractedMember(name, realsize, data_size, sparse_format,
                                             len([e for e in entries if e[1]]))

    # ------------------------------------------------------------ sparse maps

    def _old_gnu_map(self, header, sparse):
        for offset, length in header.sparse_entries:
            sparse.add(offset, length)
        extended = header.sparse_extended
        while extended:
            block = self.stream.read_exact(BLOCK)
            block_entries = parse_old_gnu_sparse_entries(block[:504], 21)
            if not block_entries:
                # GNU tar writes an extension block only for entries it holds;
                # empty ones would let a chain run on unbounded by any limit.
                raise InvalidArchiveError('%s: GNU sparse extension block without entries' % sparse.name)
            for offset, length in block_entries:
                sparse.add(offset, length)
            extended = block[504] != 0

    def _pax01_map(self, keys, sparse):
        text = keys['GNU.sparse.map']
        fields = text.split(b',') if text else []
        if len(fields) % 2:
            raise InvalidArchiveError('%s: GNU.sparse.map has an odd number of fields' % sparse.name)
        if len(fields) // 2 > self.limits.max_sparse_extents:
            raise LimitExceededError('%s: sparse map has more than %d entries'
                                     % (sparse.name, self.limits.max_sparse_extents))
        self._check_numblocks(keys, len(fields) // 2, sparse.name)
        for i in range(0, len(fields), 2):
            sparse.add(parse_decimal(fields[i], 'sparse offset'), parse_decimal(fields[i + 1], 'sparse length'))

    def _pax00_map(self, keys, pairs, sparse):
        if len(pairs) % 2:
            raise InvalidArchiveError('%s: GNU sparse 0.0 offsets and sizes do not pair up' % sparse.name)
        self._check_numblocks(keys, len(pairs) // 2, sparse.name)
        for i in range(0, len(pairs), 2):
            (k1, off), (k2, length) = pairs[i], pairs[i + 1]
            if k1 != 'GNU.sparse.offset' or k2 != 'GNU.sparse.numbytes':
                raise InvalidArchiveError('%s: GNU sparse 0.0 map out of order' % sparse.name)
            sparse.add(parse_decimal(off, 'sparse offset'), parse_decimal(length, 'sparse length'))

    @staticmethod
    def _check_numblocks(keys, count, name):
        if 'GNU.sparse.numblocks' in keys:
            declared = parse_decimal(keys['GNU.sparse.numblocks'], 'GNU.sparse.numblocks')
            if declared != count:
                raise InvalidArchiveError('%s: GNU.sparse.numblocks says %d, map has %d'
                                          % (name, declared, count))

    def _pax10_map(self, member_size, sparse):
        """Read the decimal map at the start of the member data; return its
        size in bytes (whole blocks)."""
        numbers = []
        pending = b''
        consumed = 0
        need = None
        while need is None or len(numbers) < need:
            if consumed + BLOCK > member_size:
                raise InvalidArchiveError('%s: sparse map runs past the member' % sparse.name)
            block = self.stream.read_exact(BLOCK)
            consumed += BLOCK
            lines = (pending + block).split(b'\n')
            pending = lines.pop()
            for line in lines:
                if need is not None and len(numbers) >= need:
                    break
                value = parse_decimal(line, '%s: sparse map' % sparse.name)
                if need is None:
                    if value > self.limits.max_sparse_extents:
                        raise LimitExceededError('%s: sparse map has %d entries, more than the limit of %d'
                                                 % (sparse.name, value, self.limits.max_sparse_extents))
                    need = 2 * value
                else:
                    numbers.append(value)
            if (need is None or len(numbers) < need) and len(pending) > 20:
                raise InvalidArchiveError('%s: malformed sparse map' % sparse.name)
        for i in range(0, len(numbers), 2):
            sparse.add(numbers[i], numbers[i + 1])
        return consumed

    # ------------------------------------------------------------ writing

    def _write_member(self, name, realsize, entries):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.folder_fd)
        try:
            os.ftruncate(fd, realsize)
            # A durable extraction writes back as it goes: its final fsync
            # then finds little left (see writeback.py).
            behind = WriteBehind(fd, enabled=self.fsync)
            for offset, length in entries:
                pos = offset
                for buf, start, take in self.stream.chunks(length):
                    # Zero runs stay holes: a disk stored without -S, or
                    # allocated zeros, still extracts sparse.
                    if buf[start] != 0 or not buf.startswith(_ZEROS_VIEW[:take], start):
                        view = memoryview(buf)[start:start + take]
                        done = 0
                        while done < take:
                            done += os.pwrite(fd, view[done:], pos + done)
                        behind.wrote(pos, take)
                    pos += take
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)


def extract_image_archive(src, folder, limits=DEFAULT_LIMITS, fsync=False):
    """Extract the archive read from file object ``src`` into ``folder``.

    ``folder`` must be an empty directory private to the caller (a staging
    folder); on error, what was written there is the caller's to remove.
    Returns an ExtractResult.  Raises InvalidArchiveError, UnsafeImageError or
    LimitExceededError naming the problem; errors raised by ``src`` (download
    failures) pass through unchanged.
    """
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.listdir(folder_fd):
            raise VmImageError('staging folder %s is not empty' % folder)
        stream = _DecompressedStream(src, limits)
        try:
            members = _ImageTarExtractor(stream, folder_fd, limits, fsync).run()
            return ExtractResult(folder, members, stream.compressed_bytes, stream.total)
        finally:
            stream.close()
    finally:
        os.close(folder_fd)
