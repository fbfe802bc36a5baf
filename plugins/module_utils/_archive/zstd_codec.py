# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Access to the zstandard binding, with an error that says what to install,
and a tracker of zstd frame boundaries.

Modules run on the target host, which may lack the library; importing this
file never fails, only using zstd without the library does.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    InvalidArchiveError, missing_library,
)

try:
    import zstandard as _zstandard
    ZSTD_IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - exercised on hosts without the library
    _zstandard = None
    ZSTD_IMPORT_ERROR = _exc


def zstd_module():
    if _zstandard is None:
        raise missing_library('zstandard', 'python3-zstandard', 'zstandard', ZSTD_IMPORT_ERROR)
    return _zstandard


# RFC 8878 constants.
ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC = 0x184D2A50
SKIPPABLE_MAGIC_MASK = 0xFFFFFFF0
CHECKSUM_SIZE = 4
_DICT_ID_SIZES = (0, 1, 2, 4)
_CONTENT_SIZE_SIZES = (0, 2, 4, 8)   # with Single_Segment, flag 0 means 1 byte
_BLOCK_RLE = 1
_BLOCK_RESERVED = 3

# Fields collected byte by byte (state -> field size) ...
_MAGIC = 0
_DESCRIPTOR = 1
_SKIPPABLE_SIZE = 2
_BLOCK_HEADER = 3
_FIELD_SIZES = (4, 1, 4, 3)
# ... and what follows a run of bytes that is only counted.
_AFTER_FRAME_HEADER = 10
_AFTER_BLOCK = 11
_AFTER_CHECKSUM = 12
_AFTER_SKIPPABLE = 13

_WHERE = {
    _MAGIC: 'a frame magic number',
    _DESCRIPTOR: 'a frame header',
    _SKIPPABLE_SIZE: 'a skippable frame header',
    _BLOCK_HEADER: 'a block header',
    _AFTER_FRAME_HEADER: 'a frame header',
    _AFTER_BLOCK: 'a block',
    _AFTER_CHECKSUM: "the frame's content checksum",
    _AFTER_SKIPPABLE: 'a skippable frame',
}


class ZstdFrameTracker(object):
    """Follows frame and block boundaries in the compressed bytes of a zstd stream.

    libzstd's streaming decoder, as python-zstandard exposes it, reports a
    stream that stops inside a frame (even one lacking only its checksum) as a
    clean end of data; zstd has no end-of-stream marker beyond the frames
    themselves.  This tracker reads only the frame and block headers, skipping
    block contents, so its cost is per block, not per byte, and it holds at
    most one header field.  ``check_complete()`` at the end of the input says
    whether the stream ended between frames.

    It validates nothing that libzstd validates (the decoder still checks
    every block, the window size and the checksum); anything it cannot follow
    is remembered and reported by ``check_complete()`` only, so that the
    decoder's own error, raised on the same bytes, comes first.
    """

    def __init__(self):
        self.frames = 0
        self.skippable_frames = 0
        self.checksummed_frames = 0
        self.offset = 0
        self._state = _MAGIC
        self._skip = 0
        self._pending = b''
        self._checksum = False
        self._last_block = False
        self._problem = None
        self._field_end = 0

    @property
    def at_frame_boundary(self):
        return self._problem is None and self._state == _MAGIC and not self._pending and not self._skip

    def feed(self, data):
        """Account for the next compressed bytes ``data`` (bytes-like)."""
        end = len(data)
        start = self.offset
        self.offset += end
        if self._problem is not None:
            return
        pos = 0
        while pos < end:
            if self._skip:
                take = end - pos
                if take < self._skip:
                    self._skip -= take
                    return
                pos += self._skip
                self._skip = 0
                self._skipped()
                continue
            if self._state == _BLOCK_HEADER and not self._pending:
                pos = self._blocks(data, pos, end)
                if pos >= end or self._problem is not None:
                    return
                if self._state != _BLOCK_HEADER:
                    continue
            size = _FIELD_SIZES[self._state]
            if self._pending or end - pos < size:
                piece = data[pos:pos + size - len(self._pending)]
                self._pending += bytes(piece)
                pos += len(piece)
                if len(self._pending) < size:
                    return
                value = int.from_bytes(self._pending, 'little')
                self._pending = b''
            else:
                value = int.from_bytes(data[pos:pos + size], 'little')
                pos += size
            self._field_end = start + pos
            self._field(value)
            if self._problem is not None:
                return

    def _blocks(self, data, pos, end):
        """Walk whole block headers in ``data`` from ``pos``: the one loop
        that runs once per block, so it avoids method calls.  Returns where it
        stopped: at the end of ``data``, before a header split across calls,
        or after a last block (with the state moved on)."""
        while pos + 3 <= end:
            value = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
            block_type = (value >> 1) & 3
            if block_type == _BLOCK_RESERVED:
                self._field_end = self.offset - end + pos + 3
                self._fail('reserved block type')
                return end
            pos += 3 + (1 if block_type == _BLOCK_RLE else value >> 3)
            if value & 1 or pos > end:
                self._last_block = bool(value & 1)
                self._state = _AFTER_BLOCK
                if pos > end:
                    self._skip = pos - end
                    return end
                self._skipped()
                return pos
        return pos

    def _then(self, count, state):
        """Count ``count`` bytes, then go on in ``state``."""
        self._state = state
        self._skip = count
        if not count:
            self._skipped()

    def _field(self, value):
        state = self._state
        if state == _BLOCK_HEADER:
            self._last_block = bool(value & 1)
            block_type = (value >> 1) & 3
            if block_type == _BLOCK_RESERVED:
                self._fail('reserved block type')
                return
            self._then(1 if block_type == _BLOCK_RLE else value >> 3, _AFTER_BLOCK)
        elif state == _MAGIC:
            if value == ZSTD_MAGIC:
                self._state = _DESCRIPTOR
            elif value & SKIPPABLE_MAGIC_MASK == SKIPPABLE_MAGIC:
                self._state = _SKIPPABLE_SIZE
            else:
                self._fail('unknown frame magic number 0x%08x' % value)
        elif state == _DESCRIPTOR:
            if value & 0x08:
                self._fail('reserved bit set in a frame header')
                return
            single_segment = bool(value & 0x20)
            self._checksum = bool(value & 0x04)
            content_size = _CONTENT_SIZE_SIZES[value >> 6] or (1 if single_segment else 0)
            rest = (0 if single_segment else 1) + _DICT_ID_SIZES[value & 3] + content_size
            self._then(rest, _AFTER_FRAME_HEADER)
        else:  # _SKIPPABLE_SIZE
            self._then(value, _AFTER_SKIPPABLE)

    def _skipped(self):
        state = self._state
        if state == _AFTER_BLOCK:
            if not self._last_block:
                self._state = _BLOCK_HEADER
            elif self._checksum:
                self._then(CHECKSUM_SIZE, _AFTER_CHECKSUM)
            else:
                self.frames += 1
                self._state = _MAGIC
        elif state == _AFTER_FRAME_HEADER:
            self._state = _BLOCK_HEADER
        elif state == _AFTER_CHECKSUM:
            self.frames += 1
            self.checksummed_frames += 1
            self._state = _MAGIC
        else:  # _AFTER_SKIPPABLE
            self.skippable_frames += 1
            self._state = _MAGIC

    def _fail(self, what):
        self._problem = '%s at compressed byte %d' % (what, self._field_end - _FIELD_SIZES[self._state])

    def check_complete(self):
        """Raise InvalidArchiveError unless the bytes fed so far end between frames."""
        if self._problem is not None:
            raise InvalidArchiveError('not a valid zstd stream: %s' % self._problem)
        if not self.at_frame_boundary:
            raise InvalidArchiveError(
                'archive is truncated: the zstd stream ends inside a frame, in %s, after %d compressed bytes'
                % (_WHERE[self._state], self.offset))
