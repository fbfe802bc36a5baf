# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Deciding whether an extracted image folder is safe to keep.

The pure-Python checks decide (machine.json schema, raw disk without a
foreign format signature, strict qcow2 layer backed exactly by disk.img as
raw, every table entry of it checked); qemu-img then cross-checks under
resource limits, only on files the Python checks already accepted.
VALIDATOR_VERSION is recorded with every stored image so a stricter future
validator can tell what it has not seen.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.reader import (
    DISK, LAYER, MACHINE, extract_image_archive,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import LimitExceededError, UnsafeImageError
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.format_probe import check_raw_disk
from ansible_collections.vmimage.qemu.plugins.module_utils._core.layout import WORK_PREFIX
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import DEFAULT_LIMITS
from ansible_collections.vmimage.qemu.plugins.module_utils._core.staging import WorkArea
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.machine import load_machine_json
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.qcow2 import check_layer_file
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.qemu_img import validate_with_qemu_img
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.sparse_file import allocated_bytes

# 2: the qcow2 layer's refcount, L1 and L2 tables are walked.
VALIDATOR_VERSION = 2


class ImageInfo(object):
    """What validation learned about an image folder."""

    __slots__ = ('machine', 'disk_size', 'virtual_size', 'layer_size', 'allocated_size')

    def __init__(self, machine, disk_size, virtual_size, layer_size, allocated_size):
        self.machine = machine
        self.disk_size = disk_size
        self.virtual_size = virtual_size
        self.layer_size = layer_size
        self.allocated_size = allocated_size


def read_machine_file(path, limits=DEFAULT_LIMITS):
    """Read machine.json without following links and with the size cap applied
    before reading."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UnsafeImageError('machine.json cannot be opened safely: %s' % exc.strerror)
    with os.fdopen(fd, 'rb') as f:
        data = f.read(limits.max_machine_json + 1)
    if len(data) > limits.max_machine_json:
        raise LimitExceededError('machine.json exceeds the limit of %d bytes' % limits.max_machine_json)
    return load_machine_json(data, max_size=limits.max_machine_json)


def validate_image_folder(folder, limits=DEFAULT_LIMITS, use_qemu_img=True):
    """Validate an extracted image; return ImageInfo or raise a VmImageError."""
    machine = read_machine_file(os.path.join(folder, MACHINE), limits)
    disk_size = check_raw_disk(os.path.join(folder, DISK), limits=limits, name=DISK)
    header = check_layer_file(os.path.join(folder, LAYER), limits=limits, name=LAYER,
                              expected_backing=DISK, expected_backing_format='raw')
    if use_qemu_img:
        validate_with_qemu_img(folder, limits=limits, precheck=False)
    allocated = sum(allocated_bytes(os.path.join(folder, n)) for n in (DISK, LAYER, MACHINE))
    return ImageInfo(machine, disk_size, header.size, header.file_size, allocated)


def load_image_archive(src, area, limits=DEFAULT_LIMITS, use_qemu_img=True, fsync=False):
    """Extract ``src`` into a new WorkFolder of ``area`` and validate it.

    ``area`` is a WorkArea, or a folder, which then gets one with the prefix
    WORK_PREFIX (the folder is usually the user's, beside the result).
    Returns (WorkFolder, ImageInfo, ExtractResult); the caller commits or
    discards the WorkFolder.  On any failure it is discarded before the error
    propagates, so nothing of a bad image remains; a killed extraction leaves
    a folder whose lock died with it, which the area's next collect() removes.
    """
    if not isinstance(area, WorkArea):
        area = WorkArea(area, WORK_PREFIX)
    work = area.new('image')
    try:
        result = extract_image_archive(src, work.path, limits=limits, fsync=fsync)
        info = validate_image_folder(work.path, limits=limits, use_qemu_img=use_qemu_img)
        return work, info, result
    except BaseException:
        work.discard()
        raise
