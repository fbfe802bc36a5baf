# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Start writing a big file back to disk while it is still being written.

Durability needs one fsync at the end, but left alone the kernel writes a
freshly written GiB back only then, after decompression has finished, and
the fsync alone takes as long as the whole extraction (REFERENCE §6).
``WriteBehind`` asks the kernel to start write-back of every few tens of MiB
as soon as they are written (``sync_file_range(SYNC_FILE_RANGE_WRITE)``,
which does not wait), so that the final fsync finds little left.  It never
replaces that fsync.

``sync_file_range`` has no wrapper in Python's os module; it is called
through libc with ctypes.  Where that is not possible (not Linux, no glibc
symbol, a file system that refuses it), WriteBehind does nothing and the
final fsync does all the work, as before.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ctypes
import ctypes.util
import errno
import os

SYNC_FILE_RANGE_WRITE = 2
# Big enough that the calls cost nothing, small enough that write-back runs
# alongside the writer rather than in bursts.
DEFAULT_WINDOW = 32 * 1024 * 1024


def _load_sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or None, use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


_SYNC_FILE_RANGE = _load_sync_file_range()


def sync_file_range_write(fd, offset, length):
    """Start write-back of [offset, offset+length) of ``fd``; True when the
    kernel took the request."""
    if _SYNC_FILE_RANGE is None:
        return False
    if _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EBADF, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err))


class WriteBehind(object):
    """Tracks what has been written to ``fd`` and starts its write-back every
    ``window`` bytes.  Call ``wrote(offset, length)`` after each write."""

    __slots__ = ('fd', 'window', 'enabled', '_low', '_high', '_pending', 'kicks')

    def __init__(self, fd, window=DEFAULT_WINDOW, enabled=True):
        self.fd = fd
        self.window = window
        self.enabled = enabled and _SYNC_FILE_RANGE is not None
        self._low = None
        self._high = 0
        self._pending = 0
        self.kicks = 0

    def wrote(self, offset, length):
        if not self.enabled or length <= 0:
            return
        end = offset + length
        self._low = offset if self._low is None else min(self._low, offset)
        self._high = max(self._high, end)
        self._pending += length
        if self._pending >= self.window:
            self.kick()

    def kick(self):
        """Start write-back of everything written since the last kick."""
        if not self.enabled or self._low is None:
            return
        if sync_file_range_write(self.fd, self._low, self._high - self._low):
            self.kicks += 1
        else:
            self.enabled = False
        self._low, self._high, self._pending = None, 0, 0
