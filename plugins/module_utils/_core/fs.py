# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Crash-safe writing of the library's own small files (records, aliases,
sidecars): temporary file, fsync, rename, fsync the folder.  A reader sees
the old content or the new, never a mix.  The temporary file is flock-ed by
its writer, so a crash leaves at most a ``.tmp-*`` file whose lock is free,
and collect_temporaries() of that folder (run by whoever writes there next)
removes it.  Folders of results (images, instances, mutable images) use the
WorkArea protocol of staging.py instead.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import fcntl
import json
import os
import tempfile
import time

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import StoreError, os_error


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TEMP_PREFIX = '.tmp-'
# A temporary file younger than this is never collected, whatever its lock
# says: its writer may not have flock-ed it yet (mkstemp, then flock).
TEMP_GRACE = 60


def collect_temporaries(folder, prefix=TEMP_PREFIX, grace=TEMP_GRACE):
    """Remove ``prefix`` files in ``folder`` left by killed writers: older
    than ``grace`` seconds and not flock-ed.  Returns the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    limit = time.time() - grace
    for name in sorted(names):
        if not name.startswith(prefix):
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if st.st_mtime > limit:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is alive
            os.unlink(path)
            removed.append(name)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def write_json_atomic(path, data, mode=0o644):
    """Write JSON via a temporary file, fsync, rename, fsync the folder."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(fd, 'w') as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write('\n')
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def read_json(path, max_size=4 * 1024 * 1024):
    """Read one of the library's own JSON files (never image content);
    None when it does not exist.  Any other failure is an error (a
    PermissionDeniedError for a file the user may not read), never None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise os_error(exc, 'read', path, StoreError)
    try:
        with os.fdopen(fd, 'rb') as f:
            data = f.read(max_size + 1)
    except OSError as exc:
        raise os_error(exc, 'read', path, StoreError)
    if len(data) > max_size:
        raise StoreError('%s is larger than %d bytes' % (path, max_size))
    try:
        return json.loads(data.decode('utf-8'))
    except ValueError as exc:
        raise StoreError('%s is not valid JSON: %s' % (path, exc))
