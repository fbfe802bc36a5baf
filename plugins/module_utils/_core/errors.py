# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Exception hierarchy of the vmimage.qemu core library.

Every failure the library reports is a VmImageError subclass whose message
names the problem in words an operator can act on.  Modules turn them into
``fail_json(msg=...)`` and add ``error_kind`` so playbooks can branch on the
class of failure without parsing messages.

Operating-system errors on the library's own files are turned into
NoSpaceError / PermissionDeniedError (or the caller's default class) by
``os_error()`` and ``os_errors()``, with the action and the path in the
message, so a full disk or a read-only store never reaches a user as a bare
``[Errno 28]``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import errno
import os


class VmImageError(Exception):
    """Base class: something about an image, a store or a request is wrong."""

    kind = 'error'


class InvalidArchiveError(VmImageError):
    """The archive is not a well-formed image.tar.zst (structure, tar, zstd)."""

    kind = 'invalid_archive'


class UnsafeImageError(VmImageError):
    """The image tries something an image cache must never allow
    (host file references, link tricks, format confusion, ...)."""

    kind = 'unsafe_image'


class LimitExceededError(VmImageError):
    """A size, count or time limit was exceeded while reading untrusted input."""

    kind = 'limit_exceeded'


class InvalidMachineError(VmImageError):
    """machine.json (or a machine override) breaks the schema.

    ``field`` is the JSON path of the offending value, ``rule`` the rule it broke.
    """

    kind = 'invalid_machine'

    def __init__(self, field, rule):
        self.field = field
        self.rule = rule
        super(InvalidMachineError, self).__init__('machine.json: %s: %s' % (field, rule))


class QemuImgError(VmImageError):
    """qemu-img failed, was killed by a resource limit, or is missing."""

    kind = 'qemu_img'


class DownloadError(VmImageError):
    """A download failed for good (after retries, or with a final status)."""

    kind = 'download'


class ChecksumMismatchError(VmImageError):
    """The content does not have the digest the caller asked for."""

    kind = 'checksum_mismatch'


class StoreError(VmImageError):
    """The image store is inconsistent, unreadable, or the request makes no sense for it."""

    kind = 'store'


class ImageInUseError(VmImageError):
    """An image, instance or mutable image is in use and cannot be changed or removed."""

    kind = 'in_use'


class LockTimeoutError(ImageInUseError):
    """Waiting for a lock ran out: another task has held it for longer than
    the lock timeout (the same kind as any other "in use")."""


class NotFoundError(VmImageError):
    """A named image, alias or instance does not exist."""

    kind = 'not_found'


class InvalidOptionError(VmImageError, ValueError):
    """A module option (or library argument taken from one) has a value that
    cannot work; the message names the option and the accepted forms.

    Also a ValueError, which is what such checks raised before.
    """

    kind = 'invalid_option'


class MissingLibraryError(VmImageError):
    """A Python library the task needs does not import on the target."""

    kind = 'missing_library'


class NoSpaceError(VmImageError):
    """The file system is full or the user's quota is used up (ENOSPC, EDQUOT)."""

    kind = 'no_space'


class PermissionDeniedError(VmImageError):
    """The operating system refused a file operation: file permissions, a
    read-only file system, an immutable file (EACCES, EPERM, EROFS)."""

    kind = 'permission'


# errno -> (class, words for the message).  Anything else keeps the caller's
# default class and the system's own text.
_OS_ERRORS = {
    errno.ENOSPC: (NoSpaceError, 'no space left on device'),
    errno.EDQUOT: (NoSpaceError, 'disk quota exceeded'),
    errno.EACCES: (PermissionDeniedError, 'permission denied'),
    errno.EPERM: (PermissionDeniedError, 'operation not permitted'),
    errno.EROFS: (PermissionDeniedError, 'read-only file system'),
}


def missing_library(library, debian_package, pip_name, import_error, purpose=None):
    """The MissingLibraryError for a library that failed to import, naming
    the packages that provide it.  ``purpose`` ('to download <url>') says
    what needed it."""
    return MissingLibraryError(
        "the Python library '%s' is required on the target host%s (Debian/Ubuntu: apt install %s, "
        "or pip install %s): %s" % (library, ' ' + purpose if purpose else '', debian_package, pip_name,
                                    import_error))


def os_error(exc, action, path=None, default=VmImageError):
    """A VmImageError for the OSError ``exc``: 'cannot <action> <path>: <reason>'.

    ENOSPC/EDQUOT give a NoSpaceError, EACCES/EPERM/EROFS a
    PermissionDeniedError, any other errno an instance of ``default``.  The
    file the system call named is added when it is not ``path`` itself, so
    the message says both what was being done and where it failed.  The
    result carries ``errno`` and ``path`` attributes.
    """
    cls, reason = _OS_ERRORS.get(exc.errno, (default, exc.strerror or str(exc)))
    what = '%s %s' % (action, path) if path else action
    message = 'cannot %s: %s' % (what, reason)
    where = exc.filename
    if where is not None:
        where = os.fsdecode(where) if isinstance(where, bytes) else str(where)
        if where != path:
            message += ' (%s)' % where
    error = cls(message)
    error.errno = exc.errno
    error.path = where or path
    return error


@contextlib.contextmanager
def os_errors(action, path=None, default=VmImageError):
    """Turn an OSError raised in the block into ``os_error(exc, action, path, default)``.

    Only errors with an errno (file system calls) are translated; an OSError
    without one (some network library exceptions derive from OSError) and
    every VmImageError pass through unchanged.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise os_error(exc, action, path, default)
