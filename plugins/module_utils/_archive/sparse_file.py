# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Finding the data in sparse files.

A VM disk is mostly holes.  Everything that walks a disk (packing, comparing,
usage reporting) asks the file system where the data is with
SEEK_DATA/SEEK_HOLE, so its cost follows the data, not the apparent size.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import os


def data_extents(fd, size=None):
    """Return the data extents of an open file as a list of (offset, length).

    Holes are left out; adjacent extents are merged.  On a file system without
    SEEK_DATA support the whole file is one extent (correct, just not sparse).
    """
    if size is None:
        size = os.fstat(fd).st_size
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset: the rest is a hole
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(0, size)] if size else []
            raise
        if start >= size:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        end = min(end, size)
        if extents and extents[-1][0] + extents[-1][1] == start:
            extents[-1] = (extents[-1][0], end - extents[-1][0])
        else:
            extents.append((start, end - start))
        offset = end
    return extents


def allocated_bytes(path):
    """Bytes the file system really holds for ``path`` (st_blocks is in 512-byte units)."""
    return os.stat(path).st_blocks * 512


def data_bytes(extents):
    return sum(length for _offset, length in extents)
