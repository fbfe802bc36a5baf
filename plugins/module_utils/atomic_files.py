# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Crash-safe writing of the library's own small files (records, aliases,
sidecars): temporary file, fsync, rename, fsync the folder.  A reader sees
the old content or the new, never a mix, and a crash leaves at most a
``.tmp-*`` file that nothing reads.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import json
import os
import tempfile

from ansible_collections.vmimage.qemu.plugins.module_utils.errors import StoreError, os_error


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path, data, mode=0o644):
    """Write JSON via a temporary file, fsync, rename, fsync the folder."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=folder)
    try:
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
