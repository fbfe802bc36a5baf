# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Exception hierarchy of the vmimage.qemu core library.

Every failure the library reports is a VmImageError subclass whose message
names the problem in words an operator can act on.  Modules turn them into
``fail_json(msg=...)`` and add ``error_kind`` so playbooks can branch on the
class of failure without parsing messages.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


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


class NotFoundError(VmImageError):
    """A named image, alias or instance does not exist."""

    kind = 'not_found'
