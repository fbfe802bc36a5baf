# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Format-confusion guard for disks that must be raw.

A ``disk.img`` is always opened with ``-f raw``, so a signature inside it is
harmless to us; but anything that ever probes it (an older tool, an operator
running ``qemu-img info disk.img``, a VM definition without a format) would
then honour the embedded header: its backing file, extents or data file, and
read host files (CVE-2008-2004, CVE-2024-40767).  A raw disk that carries the
signature of a format QEMU recognises is therefore refused outright.

The signatures are the ones QEMU's block drivers probe for (``bdrv_probe`` of
bochs, cloop, crypto/luks, dmg, parallels, qcow, qcow2, qed, vdi, vhdx, vmdk and
vpc), plus the footer-only variants that the drivers accept on open (fixed VHD,
DMG's ``koly`` trailer).  Only the first 4 KiB and the last 1 KiB are read, so
probing a sparse 50 GiB file costs two small reads.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import os
import stat
import struct

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    LimitExceededError, UnsafeImageError,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import DEFAULT_LIMITS

# QEMU probes the first 2 KiB (BLOCK_PROBE_BUF_SIZE); 4 KiB also covers a VMDK
# descriptor preceded by a long comment block.
HEAD_SIZE = 4096
# A fixed VHD keeps its 512-byte footer at the very end (old Virtual PC wrote
# 511 bytes); DMG keeps its 512-byte 'koly' trailer there.
TAIL_SIZE = 1024
_QEMU_PROBE_SIZE = 2048

_QCOW_MAGIC = b'QFI\xfb'
_VDI_SIGNATURE = struct.pack('<I', 0xbeda107f)
_VDI_SIGNATURE_OFFSET = 0x40
_PARALLELS_MAGICS = (b'WithoutFreeSpace', b'WithouFreSpacExt')
_CLOOP_PREFIX = b'#!/bin/sh\n#V2.0 Format'
_VMDK_DESCRIPTOR = b'# Disk DescriptorFile'


def open_regular_file(path, name=None):
    """Open ``path`` read-only as a binary file object, refusing anything but a
    regular file.

    Symbolic links are not followed (O_NOFOLLOW) and FIFOs or devices are
    refused before a single byte is read: an extracted image member that is a
    link to a host file, or a FIFO that blocks the reader forever, must never be
    inspected in place of the real member.
    """
    label = name or os.path.basename(os.fsdecode(path))
    flags = os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_NONBLOCK', 0)
    flags |= getattr(os, 'O_CLOEXEC', 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeImageError('%s: is a symbolic link, not a regular file' % label)
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeImageError('%s: is not a regular file (mode %s)'
                                   % (label, stat.filemode(st.st_mode)))
        return os.fdopen(fd, 'rb')
    except BaseException:
        os.close(fd)
        raise


def file_size(fileobj):
    """Apparent size of an open file (or a BytesIO)."""
    try:
        return os.fstat(fileobj.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        # BytesIO and friends have no descriptor: seeking to the end is exact.
        return fileobj.seek(0, os.SEEK_END)


def read_exact_at(fileobj, offset, length):
    """Read up to ``length`` bytes at ``offset`` (fewer only at end of file)."""
    fileobj.seek(offset)
    chunks = []
    remaining = length
    while remaining > 0:
        chunk = fileobj.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b''.join(chunks)


def read_head_and_tail(fileobj, head_size=HEAD_SIZE, tail_size=TAIL_SIZE):
    """Return ``(size, head, tail)``: the apparent size, the first ``head_size``
    bytes and the last ``tail_size`` bytes (which may overlap ``head``).

    The file position is restored afterwards so callers can share the object.
    """
    try:
        saved = fileobj.tell()
    except (AttributeError, OSError):
        saved = None
    try:
        size = file_size(fileobj)
        head = read_exact_at(fileobj, 0, head_size)
        tail_offset = max(0, size - tail_size)
        tail = read_exact_at(fileobj, tail_offset, size - tail_offset)
    finally:
        if saved is not None:
            fileobj.seek(saved)
    return size, head, tail


def _vmdk_descriptor_probe(buf):
    """Mirror QEMU's vmdk_probe text branch: skip ``#`` comment lines and lines
    of spaces, then accept ``version=1|2|3`` followed by LF or CRLF."""
    p = 0
    end = len(buf)
    while p < end:
        c = buf[p:p + 1]
        if c == b'#':
            nl = buf.find(b'\n', p)
            if nl < 0:
                return False
            p = nl + 1
            continue
        if c == b' ':
            while p < end and buf[p:p + 1] == b' ':
                p += 1
            if p < end and buf[p:p + 1] == b'\r':
                p += 1
            if p == end or buf[p:p + 1] != b'\n':
                return False
            p += 1
            continue
        for version in (b'1', b'2', b'3'):
            line = b'version=' + version
            if buf.startswith(line + b'\n', p) or buf.startswith(line + b'\r\n', p):
                return True
        return False
    return False


def _signature_of(size, head, tail):
    magic4 = head[:4]
    if magic4 == _QCOW_MAGIC:
        version = struct.unpack('>I', head[4:8])[0] if len(head) >= 8 else 0
        # qcow_probe claims version 1, qcow2_probe 2 and up; anything else with
        # this magic is still nothing a raw disk should start with.
        return 'qcow' if version == 1 else 'qcow2'
    if magic4 == b'QED\x00':
        return 'qed'
    if magic4 in (b'KDMV', b'COWD'):
        return 'vmdk'
    if head.startswith(b'vhdxfile'):
        return 'vhdx'
    if head.startswith(b'conectix'):
        return 'vpc'
    if head.startswith(b'LUKS\xba\xbe'):
        return 'luks'
    if head[:16] in _PARALLELS_MAGICS:
        return 'parallels'
    if head.startswith(b'Bochs Virtual HD Image'):
        return 'bochs'
    if head.startswith(_CLOOP_PREFIX):
        return 'cloop'
    if _vmdk_descriptor_probe(head[:_QEMU_PROBE_SIZE]) or _VMDK_DESCRIPTOR in head:
        return 'vmdk'
    if head[_VDI_SIGNATURE_OFFSET:_VDI_SIGNATURE_OFFSET + 4] == _VDI_SIGNATURE:
        return 'vdi'
    # Trailers: the tail holds the last TAIL_SIZE bytes of the file.
    # QEMU's vpc_open looks at size-512; size-511 covers the 511-byte footers
    # old Virtual PC versions wrote, which other VHD readers accept.
    if size >= 512 and (tail[-512:-504] == b'conectix' or tail[-511:-503] == b'conectix'):
        return 'vpc'
    if size >= 512 and tail[-512:-508] == b'koly':
        return 'dmg'
    return None


def detect_image_signature(path_or_fileobj):
    """Return the QEMU format name whose signature the file carries, or None.

    Names follow QEMU's drivers: ``qcow2``, ``qcow``, ``qed``, ``vmdk``,
    ``vdi``, ``vpc`` (VHD), ``vhdx``, ``luks``, ``parallels``, ``dmg``,
    ``bochs``, ``cloop``.  Reads at most HEAD_SIZE + TAIL_SIZE bytes.
    """
    if hasattr(path_or_fileobj, 'read'):
        size, head, tail = read_head_and_tail(path_or_fileobj)
    else:
        with open_regular_file(path_or_fileobj) as fileobj:
            size, head, tail = read_head_and_tail(fileobj)
    return _signature_of(size, head, tail)


def check_raw_disk(path, limits=DEFAULT_LIMITS, name='disk.img'):
    """Accept ``path`` as a raw disk or raise; return its apparent size.

    LimitExceededError when the apparent size exceeds limits.max_member_size,
    UnsafeImageError when it is not a regular file or carries the signature of
    another image format (format confusion).
    """
    with open_regular_file(path, name) as fileobj:
        size, head, tail = read_head_and_tail(fileobj)
    if size > limits.max_member_size:
        raise LimitExceededError('%s: apparent size %d bytes exceeds the limit of %d bytes'
                                 % (name, size, limits.max_member_size))
    found = _signature_of(size, head, tail)
    if found is not None:
        raise UnsafeImageError('%s: looks like a %s image, not raw (format confusion)'
                               % (name, found))
    return size
