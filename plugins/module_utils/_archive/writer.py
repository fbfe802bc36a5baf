# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Packing an image folder into ``image.tar.zst``.

The disk is written as a GNU sparse 1.0 pax member, the layout GNU tar
writes with ``--format=posix --sparse-version=1.0`` and extracts with ``-S``.
Only the data extents the file system reports are read, so packing costs
follow the data, not the apparent size.  Everything that varies between runs
(owners, times, GNU tar's pid in the sparse name) is fixed, and zstd always
runs in its multi-threaded mode, whose output does not depend on the number
of workers: the same folder gives the same bytes on any host.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import os
import stat

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import InvalidArchiveError, VmImageError
from ansible_collections.vmimage.qemu.plugins.module_utils._core.writeback import DEFAULT_WINDOW, WriteBehind
from ansible_collections.vmimage.qemu.plugins.module_utils._core.layout import DISK, LAYER, MACHINE, MEMBER_NAMES  # noqa: F401
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.sparse_file import data_extents
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.tar_format import (
    BLOCK, build_ustar_header, padding, pax_record,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.zstd_codec import zstd_module

# Deterministic archives: always this order.
MEMBER_ORDER = MEMBER_NAMES

# GNU tar puts its pid in this name; a constant keeps the archive reproducible.
SPARSE_MEMBER_NAME = './GNUSparseFile.0/' + DISK
PAX_HEADER_NAME = './PaxHeaders/' + DISK
USTAR_MAX_SIZE = 8 ** 11 - 1
READ_BUFFER = 4 * 1024 * 1024


class PackResult(object):
    """What was written: sizes, the archive digest and the disk's data map."""

    __slots__ = ('archive_size', 'digest', 'disk_size', 'data_bytes', 'extents', 'level')

    def __init__(self, archive_size, digest, disk_size, data_bytes, extents, level):
        self.archive_size = archive_size
        self.digest = digest
        self.disk_size = disk_size
        self.data_bytes = data_bytes
        self.extents = extents
        self.level = level


class _HashingSink(object):
    """File-like the compressor writes into: forwards, counts and hashes."""

    def __init__(self, out, write_behind=False):
        self._out = out
        self._sha256 = hashlib.sha256()
        self.size = 0
        self._behind = None
        if write_behind:
            # The archive is written front to back: start its write-back as
            # it grows, so the caller's fsync finds little left.
            self._behind = WriteBehind(out.fileno(), window=DEFAULT_WINDOW)
        self._unkicked = 0

    def write(self, data):
        self._sha256.update(data)
        start = self.size
        self.size += len(data)
        # A raw (unbuffered) file may write less than asked: loop until done.
        view = memoryview(data)
        while view:
            written = self._out.write(view)
            if written is None:  # buffered writers return None or the full length
                break
            view = view[written:]
        if self._behind is not None:
            self._unkicked += len(data)
            if self._unkicked >= DEFAULT_WINDOW:
                self.flush()  # the bytes must be in the file before their write-back can start
                self._behind.wrote(start + len(data) - self._unkicked, self._unkicked)
                self._behind.kick()
                self._unkicked = 0
        return len(data)

    def flush(self):
        flush = getattr(self._out, 'flush', None)
        if flush is not None:
            flush()

    def hexdigest(self):
        return self._sha256.hexdigest()


def sparse_map_text(entries):
    """The GNU sparse 1.0 map block(s): count, then offset/length lines, padded."""
    lines = [str(len(entries))]
    for offset, length in entries:
        lines.append(str(offset))
        lines.append(str(length))
    text = ('\n'.join(lines) + '\n').encode('ascii')
    return text + padding(len(text))


def _sparse_entries(extents, size):
    """GNU tar always closes the map with (size, 0) when the file ends in a hole,
    so extractors that size files from the map get the length right."""
    entries = list(extents)
    if not entries or entries[-1][0] + entries[-1][1] < size:
        entries.append((size, 0))
    return entries


def zstd_threads(threads):
    """Worker count for zstd: 0 means every core; never the single-thread mode,
    whose output differs from the multi-threaded one."""
    if threads is None or threads <= 0:
        threads = os.cpu_count() or 1
    return max(1, int(threads))


def _open_member(folder_fd, name):
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    except OSError as exc:
        raise VmImageError('cannot read %s: %s' % (name, exc.strerror))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InvalidArchiveError('%s is not a regular file' % name)
    return fd, st.st_size


def _copy_range(fd, offset, length, writer, buf, view):
    end = offset + length
    pos = offset
    while pos < end:
        want = min(len(buf), end - pos)
        got = os.preadv(fd, [view[:want]], pos)
        if got <= 0:
            raise VmImageError('file shrank while packing (short read at offset %d)' % pos)
        writer.write(view[:got])
        pos += got


def write_image_archive(folder, out, level=3, threads=0, mtime=0, write_behind=False):
    """Pack ``folder``/{disk.img, layer.qcow2, machine.json} into ``out``.

    ``out`` is a binary file object opened by the caller (the caller owns
    staging and renaming).  ``write_behind``: ``out`` is a file the caller
    will fsync, whose write-back may start while it is written.  Returns a
    PackResult with the sha256 of the bytes written.
    """
    zstd = zstd_module()
    if not 1 <= int(level) <= 22:
        raise ValueError('compression level must be between 1 and 22, got %r' % level)
    sink = _HashingSink(out, write_behind=write_behind)
    compressor = zstd.ZstdCompressor(level=int(level), threads=zstd_threads(threads),
                                     write_checksum=True, write_content_size=False)
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fds = []
    try:
        members = {}
        for name in MEMBER_ORDER:
            fd, size = _open_member(folder_fd, name)
            fds.append(fd)
            members[name] = (fd, size)
        buf = bytearray(READ_BUFFER)
        view = memoryview(buf)
        writer = compressor.stream_writer(sink, closefd=False, write_size=1024 * 1024)

        disk_fd, disk_size = members[DISK]
        extents = data_extents(disk_fd, disk_size)
        entries = _sparse_entries(extents, disk_size)
        map_block = sparse_map_text(entries)
        data_bytes = sum(length for _offset, length in extents)
        stored = len(map_block) + data_bytes
        records = [
            pax_record('GNU.sparse.major', 1),
            pax_record('GNU.sparse.minor', 0),
            pax_record('GNU.sparse.name', DISK),
            pax_record('GNU.sparse.realsize', disk_size),
        ]
        if stored > USTAR_MAX_SIZE:
            records.append(pax_record('size', stored))
        pax = b''.join(records)
        writer.write(build_ustar_header(PAX_HEADER_NAME, len(pax), mtime=mtime, typeflag=b'x'))
        writer.write(pax + padding(len(pax)))
        writer.write(build_ustar_header(SPARSE_MEMBER_NAME, 0 if stored > USTAR_MAX_SIZE else stored,
                                        mtime=mtime))
        writer.write(map_block)
        for offset, length in extents:
            _copy_range(disk_fd, offset, length, writer, buf, view)
        writer.write(padding(stored))

        for name in (LAYER, MACHINE):
            fd, size = members[name]
            if size > USTAR_MAX_SIZE:
                raise VmImageError('%s is too large to pack (%d bytes)' % (name, size))
            writer.write(build_ustar_header(name, size, mtime=mtime))
            _copy_range(fd, 0, size, writer, buf, view)
            writer.write(padding(size))
        # End of archive: two zero blocks.
        writer.write(b'\0' * (2 * BLOCK))
        writer.flush(zstd.FLUSH_FRAME)
        sink.flush()
        return PackResult(sink.size, 'sha256:' + sink.hexdigest(), disk_size, data_bytes, extents, level)
    finally:
        for fd in fds:
            os.close(fd)
        os.close(folder_fd)
