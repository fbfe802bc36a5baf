# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""The one crash-safety protocol every writer of the collection uses.

A writer never builds anything where readers look.  It asks a WorkArea (a
folder beside the place the result will live, on the same file system) for a
WorkFolder, which is

* ``<area>/<prefix><tag>-<pid>-<random>/``: where the work happens, and
* ``<area>/<prefix><tag>-<pid>-<random>.lock``: a flock held for as long as
  the writer lives, created before the folder and removed after it, so a
  folder whose lock file is missing or free has no live owner.

The result appears by ``commit()``: fsync the folder, one rename to its
final name, fsync both parents.  Something that must go is ``trash()``-ed:
one rename into the area (it vanishes atomically for readers), then deleted.
A writer killed at any point leaves only names inside the area, and
``collect()`` -- run by whoever opens the store or the folder next -- removes
those whose owner is gone.  Nothing is ever half visible outside the area.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import os
import shutil
import stat

from ansible_collections.vmimage.qemu.plugins.module_utils._core.fs import fsync_dir
from ansible_collections.vmimage.qemu.plugins.module_utils._core.locks import FileLock, try_lock

LOCK_SUFFIX = '.lock'
TRASH_TAG = 'trash'


def fsync_tree(path):
    """fsync every file and folder below ``path`` (and ``path`` itself)."""
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                continue
            fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def remove_tree(path):
    """Delete ``path`` (a file or a folder, read-only parts included);
    a missing path is fine.  Never raises for what it cannot remove: the
    next collect() tries again."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    # Cached images are read-only (files 0444, folders 0555): deleting their
    # entries needs write permission on each folder first.
    for dirpath, dirnames, _filenames in os.walk(path):
        for name in [dirpath] + [os.path.join(dirpath, d) for d in dirnames]:
            try:
                if not os.path.islink(name):
                    os.chmod(name, 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


class WorkFolder(object):
    """A folder of a WorkArea owned by this process (see the module doc)."""

    def __init__(self, area, name, lock):
        self.area = area
        self.name = name
        self.path = os.path.join(area.path, name)
        self._lock = lock

    @property
    def active(self):
        return self._lock is not None

    def commit(self, target, replace=False):
        """Move the folder to ``target`` in one rename, durably.  Without
        ``replace`` an existing ``target`` is an error (EEXIST/ENOTEMPTY)."""
        fsync_dir(self.path)
        if not replace and os.path.lexists(target):
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), target)
        os.rename(self.path, target)
        parent = os.path.dirname(os.path.abspath(target))
        fsync_dir(parent)
        if parent != self.area.path:
            fsync_dir(self.area.path)
        self._release()

    def commit_file(self, name, target):
        """Move the file ``name`` of the folder to ``target`` (same file
        system), durably, replacing what was there; the folder is then
        discarded."""
        path = os.path.join(self.path, name)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(path, target)
        fsync_dir(os.path.dirname(os.path.abspath(target)))
        self.discard()

    def discard(self):
        """Remove the folder and its lock (idempotent)."""
        if self._lock is None:
            return
        remove_tree(self.path)
        self._release()

    def _release(self):
        lock, self._lock = self._lock, None
        try:
            os.unlink(self.path + LOCK_SUFFIX)
        except OSError:
            pass
        finally:
            lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()


class WorkArea(object):
    """The folder where WorkFolders of one kind of writer live.

    ``prefix`` marks the area's own names when it shares its folder with
    other things (a mutable image's parent folder, the instances folder);
    only names starting with it are ever collected.
    """

    def __init__(self, path, prefix='', mode=0o700):
        self.path = os.path.abspath(path)
        self.prefix = prefix
        self.mode = mode

    def ensure(self):
        try:
            os.mkdir(self.path, self.mode)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        return self

    def new(self, tag, mode=0o700):
        """A new WorkFolder, its lock held."""
        name = '%s%s-%d-%s' % (self.prefix, tag, os.getpid(), os.urandom(6).hex())
        lock = FileLock(os.path.join(self.path, name + LOCK_SUFFIX), timeout=0).acquire()
        try:
            os.mkdir(os.path.join(self.path, name), mode)
        except BaseException:
            try:
                os.unlink(os.path.join(self.path, name + LOCK_SUFFIX))
            finally:
                lock.release()
            raise
        return WorkFolder(self, name, lock)

    def trash(self, path):
        """Make ``path`` vanish at once (one rename into the area, then
        durable), then delete it.  A missing ``path`` is fine; returns
        whether there was one."""
        name = '%s%s-%d-%s' % (self.prefix, TRASH_TAG, os.getpid(), os.urandom(6).hex())
        target = os.path.join(self.path, name)
        try:
            os.rename(path, target)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        remove_tree(target)
        return True

    def collect(self):
        """Remove what killed writers left: work folders whose lock is free
        or gone, their lock files, and trash.  Returns the names removed."""
        try:
            names = sorted(os.listdir(self.path))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return []
            raise
        removed = []
        for name in names:
            if not name.startswith(self.prefix):
                continue
            base = name[:-len(LOCK_SUFFIX)] if name.endswith(LOCK_SUFFIX) else name
            if base in removed:
                continue
            folder = os.path.join(self.path, base)
            if base[len(self.prefix):].startswith(TRASH_TAG + '-'):
                remove_tree(folder)
                removed.append(base)
                continue
            if self._collect_one(folder):
                removed.append(base)
        return removed

    @staticmethod
    def _collect_one(folder):
        """Remove ``folder`` and its lock file when no live writer owns it.

        Decided at this moment, never from the listing.  The folder is looked
        at before the lock: a writer creates its lock before its folder and
        removes it after the folder, so a folder seen while its lock file is
        missing a moment later has no owner.
        """
        lock_path = folder + LOCK_SUFFIX
        folder_there = os.path.lexists(folder)
        try:
            held = try_lock(lock_path) if os.path.lexists(lock_path) else None
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            held = None
        if held is None:
            if os.path.lexists(lock_path) or not folder_there:
                return False  # owner alive, or nothing there
            remove_tree(folder)
            return True
        try:
            remove_tree(folder)
            try:
                os.unlink(lock_path)
            except OSError:
                pass
            return True
        finally:
            held.release()
