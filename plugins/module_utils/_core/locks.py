# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Kernel file locks (flock) for coordinating processes on one host.

flock locks belong to the open file and vanish when the process dies, so a
killed fetch never leaves a lock that blocks the next run: there is nothing
to clean up and no pid file to second-guess.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import fcntl
import os
import time

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import StoreError


class FileLock(object):
    """An flock on ``path`` (created if missing), shared or exclusive.

    ``timeout`` None waits forever; 0 tries once.  Use as a context manager.
    """

    def __init__(self, path, exclusive=True, timeout=None, poll=0.05):
        self.path = path
        self.exclusive = exclusive
        self.timeout = timeout
        self.poll = poll
        self._fd = None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
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
                            raise StoreError('timed out after %.0f s waiting for lock %s'
                                             % (self.timeout, self.path))
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


def try_lock(path, exclusive=True):
    """Return a held FileLock, or None if another process holds it."""
    lock = FileLock(path, exclusive=exclusive, timeout=0)
    try:
        return lock.acquire()
    except StoreError:
        return None
