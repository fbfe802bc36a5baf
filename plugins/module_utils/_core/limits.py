# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Limits applied to untrusted images.

One object carries every bound the readers and validators enforce, so a caller
(a module option, a test) can tighten them in one place.  The defaults follow
the original system (50 GiB members, 1 MiB machine.json) and zstd's own
decoder default for the window size.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

GIB = 1024 ** 3
MIB = 1024 ** 2


class ImageLimits(object):
    """Bounds for reading and validating one image.

    max_member_size:    apparent size of any archive member (bytes)
    max_written_bytes:  bytes actually written to disk while extracting (all members)
    max_virtual_size:   virtual size a qcow2 layer may declare (bytes)
    max_machine_json:   size of machine.json (bytes)
    max_window_size:    zstd window a frame may ask for (bytes)
    max_sparse_extents: entries in one member's sparse map
    max_compressed_bytes: bytes of compressed input accepted (None: no bound)
    qemu_img_cpu_seconds / qemu_img_memory: rlimits for qemu-img on untrusted files
    """

    __slots__ = (
        'max_member_size', 'max_written_bytes', 'max_virtual_size', 'max_machine_json',
        'max_window_size', 'max_sparse_extents', 'max_compressed_bytes',
        'qemu_img_cpu_seconds', 'qemu_img_memory',
    )

    def __init__(self, max_member_size=50 * GIB, max_written_bytes=None, max_virtual_size=None,
                 max_machine_json=1 * MIB, max_window_size=128 * MIB, max_sparse_extents=1000000,
                 max_compressed_bytes=None, qemu_img_cpu_seconds=30, qemu_img_memory=1 * GIB):
        self.max_member_size = int(max_member_size)
        # Data actually written can never legitimately exceed the apparent sizes
        # of the three members, so that is the default bound.
        self.max_written_bytes = int(max_written_bytes if max_written_bytes is not None
                                     else 2 * self.max_member_size + max_machine_json)
        self.max_virtual_size = int(max_virtual_size if max_virtual_size is not None
                                    else self.max_member_size)
        self.max_machine_json = int(max_machine_json)
        self.max_window_size = int(max_window_size)
        self.max_sparse_extents = int(max_sparse_extents)
        self.max_compressed_bytes = max_compressed_bytes
        self.qemu_img_cpu_seconds = int(qemu_img_cpu_seconds)
        self.qemu_img_memory = int(qemu_img_memory)
        for name in self.__slots__:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError('limit %s must be positive, got %r' % (name, value))

    def __repr__(self):
        return 'ImageLimits(%s)' % ', '.join('%s=%r' % (n, getattr(self, n)) for n in self.__slots__)


DEFAULT_LIMITS = ImageLimits()
