# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Kernel file locks (flock) for coordinating processes on one host.

flock locks belong to the open file and vanish when the process dies, so a
killed fetch never leaves a lock that blocks the next run: there is nothing
to clean up and no pid file to second-guess.  Every lock of the collection
is a FileLock, and every wait that runs out is a LockTimeoutError.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import fcntl
import os
import time

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    LockTimeoutError, NotFoundError, VmImageError,
)


class FileLock(object):
    """An flock on ``path``, shared or exclusive.

    ``path`` is a lock file (created if missing) or, with ``folder=True``, an
    existing folder locked through its own descriptor (nothing is created in
    it).  ``timeout`` None waits forever; 0 tries once.  ``what`` names the
    lock in the timeout message.  Use as a context manager.
    """

    def __init__(self, path, exclusive=True, timeout=None, poll=0.05, folder=False, what=None):
        self.path = path
        self.exclusive = exclusive
        self.timeout = timeout
        self.poll = poll
        self.folder = folder
        self.what = what or 'lock %s' % path
        self._fd = None

    def _open(self):
        if not self.folder:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError('%s does not exist' % self.path)
        except NotADirectoryError:
            raise VmImageError('%s is not a folder' % self.path)

    def acquire(self):
        fd = self._open()
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        try:
            if self.timeout is None:
                fcntl.flock(fd, mode)
            else:
                deadline = time.monotonic() + self.timeout
                while True:
                    try:
                        fcntl.flock(fd, mode | fcntl.LOCK_NB)
                        break
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() >= deadline:
                            raise LockTimeoutError('timed out after %.0f s waiting for %s: another task holds it'
                                                   % (self.timeout, self.what))
                        time.sleep(self.poll)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self):
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def try_lock(path, exclusive=True, folder=False):
    """Return a held FileLock, or None if another process holds it."""
    lock = FileLock(path, exclusive=exclusive, timeout=0, folder=folder)
    try:
        return lock.acquire()
    except LockTimeoutError:
        return None
