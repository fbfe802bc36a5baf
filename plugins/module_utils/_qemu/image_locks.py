# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Is a disk image in use by a running QEMU (or anything else writing it)?

QEMU announces what it does with an image file through open-file-description
(OFD) byte-range locks, taken with F_OFD_SETLK on the file it opened
(block/file-posix.c): byte ``100 + n`` read-locked means "I hold permission
n", byte ``200 + n`` read-locked means "I do not let others hold permission
n", for n in consistent read (0), write (1), write unchanged (2), resize (3)
and graph modification (4).  Any QEMU that has an image open therefore holds
at least one lock in [100, 300).  Testing for a *write* lock over that range
with F_OFD_GETLK conflicts with every such lock, and reads nothing, changes
nothing and never blocks; the kernel drops the locks when QEMU exits, however
it exits, so there is no stale state to clean up.

The holders are found in /proc: every process with a descriptor on the same
inode, with the locks and access mode the kernel reports in
``/proc/<pid>/fdinfo/<fd>``.  A process that has the file open for writing
without locks (QEMU with ``file.locking=off``, ``dd``, ...) counts as a user
too: packing or removing a disk under it is just as wrong.

Only Linux is supported (OFD locks and /proc).  Processes of other users are
visible to root only; their QEMU locks are detected all the same, only their
pid cannot be named.

Caveat of the probe: it opens and closes the file, and closing any descriptor
drops the *calling* process's classic POSIX (F_SETLK) locks on that file.
The collection itself uses flock and OFD locks only, which are unaffected.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import fcntl
import os
import stat
import struct

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import ImageInUseError

# Linux values (include/uapi/asm-generic/fcntl.h); Python's fcntl module
# exports them only since 3.9 on some builds, so they are spelled out here.
F_OFD_GETLK = getattr(fcntl, 'F_OFD_GETLK', 36)
F_OFD_SETLK = getattr(fcntl, 'F_OFD_SETLK', 37)

# struct flock {short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid;}
# in native alignment (64-bit off_t: Python is built with large-file support).
_FLOCK = struct.Struct('hhqqi')
# The kernel copies sizeof(struct flock) bytes, which includes tail padding
# that struct does not add; a larger zeroed buffer covers it on every ABI.
_FLOCK_BUFFER = 64

QEMU_PERM_BASE = 100
QEMU_SHARED_BASE = 200
# QEMU uses 100 + bit and 200 + bit; the ranges leave room for new bits.
QEMU_LOCK_START = QEMU_PERM_BASE
QEMU_LOCK_END = QEMU_SHARED_BASE + 100
QEMU_PERMISSIONS = ('consistent read', 'write', 'write unchanged', 'resize', 'graph modification')

_O_ACCMODE = 0o3
_MAX_COMMAND = 200


def _flock_bytes(l_type, start, length):
    data = _FLOCK.pack(l_type, os.SEEK_SET, start, length, 0)
    return data + b'\0' * (_FLOCK_BUFFER - len(data))


def _get_lock(fd, start, length, cmd):
    """The first lock that would block a write lock on [start, start+length),
    as (l_type, l_start, l_len), or None."""
    raw = fcntl.fcntl(fd, cmd, _flock_bytes(fcntl.F_WRLCK, start, length))
    l_type, _whence, l_start, l_len, _pid = _FLOCK.unpack(raw[:_FLOCK.size])
    if l_type == fcntl.F_UNLCK:
        return None
    return l_type, l_start, l_len


def _open_for_probe(path):
    """A descriptor to test locks on, or None when there is nothing lockable.

    O_NONBLOCK: opening a FIFO or a tty must not hang the probe.  Regular files
    and block devices are what QEMU opens as images; anything else holds no
    image lock.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        return None
    return fd


def _probe(fd, start, length):
    try:
        return _get_lock(fd, start, length, F_OFD_GETLK)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # Kernels before 3.15 have no OFD locks; QEMU then falls back to
        # classic POSIX locks, which F_GETLK reports just as well.
        return _get_lock(fd, start, length, fcntl.F_GETLK)


def is_locked(path):
    """True when any lock is held in QEMU's lock range (one fcntl call)."""
    fd = _open_for_probe(path)
    if fd is None:
        return False
    try:
        return _probe(fd, QEMU_LOCK_START, QEMU_LOCK_END - QEMU_LOCK_START) is not None
    finally:
        os.close(fd)


def locked_bytes(path):
    """The bytes of QEMU's lock range that someone holds a lock on.

    Returns a sorted list of (offset, kind) with kind 'read' or 'write'; empty
    when the file is not locked (or does not exist).  One probe covers the
    whole range; only when it finds a lock is each byte tested, to say which.
    """
    fd = _open_for_probe(path)
    if fd is None:
        return []
    try:
        if _probe(fd, QEMU_LOCK_START, QEMU_LOCK_END - QEMU_LOCK_START) is None:
            return []
        found = []
        for offset in range(QEMU_LOCK_START, QEMU_LOCK_END):
            lock = _probe(fd, offset, 1)
            if lock is not None:
                found.append((offset, 'write' if lock[0] == fcntl.F_WRLCK else 'read'))
        return found
    finally:
        os.close(fd)


def describe_locks(found):
    """Words for locked_bytes(): which QEMU permissions are held or denied."""
    held, denied, other = [], [], []
    for offset, _kind in found:
        if QEMU_PERM_BASE <= offset < QEMU_PERM_BASE + len(QEMU_PERMISSIONS):
            held.append(QEMU_PERMISSIONS[offset - QEMU_PERM_BASE])
        elif QEMU_SHARED_BASE <= offset < QEMU_SHARED_BASE + len(QEMU_PERMISSIONS):
            denied.append(QEMU_PERMISSIONS[offset - QEMU_SHARED_BASE])
        else:
            other.append(str(offset))
    parts = []
    if held:
        parts.append('uses ' + ', '.join(held))
    if denied:
        parts.append("refuses others' " + ', '.join(denied))
    if other:
        parts.append('locks byte(s) ' + ', '.join(other))
    return '; '.join(parts)


def _read_small(path, limit=65536):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _command(pid):
    """The program name of a process: argv[0]'s base name, never its arguments
    (a QEMU command line can carry secrets)."""
    try:
        argv0 = _read_small('/proc/%d/cmdline' % pid).split(b'\0', 1)[0]
        if argv0:
            return os.path.basename(os.fsdecode(argv0))[:_MAX_COMMAND]
        return os.fsdecode(_read_small('/proc/%d/comm' % pid)).strip()[:_MAX_COMMAND]
    except OSError:
        return '?'


def _fdinfo(pid, fd):
    """(writable, lock lines) of one descriptor, from /proc/<pid>/fdinfo/<fd>."""
    try:
        text = _read_small('/proc/%d/fdinfo/%s' % (pid, fd)).decode('ascii', 'replace')
    except OSError:
        return None
    writable = False
    locks = []
    for line in text.splitlines():
        if line.startswith('flags:'):
            try:
                writable = (int(line.split()[1], 8) & _O_ACCMODE) != os.O_RDONLY
            except (IndexError, ValueError):
                pass
        elif line.startswith('lock:'):
            lock = line[5:].strip()
            if _in_qemu_range(lock):
                locks.append(lock)
    return writable, locks


def _in_qemu_range(lock):
    """Whether a /proc lock line ('1: OFDLCK ADVISORY READ -1 fe:00:123 100 101')
    is a byte-range lock overlapping QEMU's range; flock and leases are not."""
    fields = lock.split()
    if len(fields) < 4 or fields[1] not in ('POSIX', 'OFDLCK') or '->' in fields:
        return False
    try:
        start = int(fields[-2])
        end = None if fields[-1] == 'EOF' else int(fields[-1])
    except ValueError:
        return False
    return start < QEMU_LOCK_END and (end is None or end >= QEMU_LOCK_START)


def _open_descriptors(inodes):
    """{(dev, ino): [(pid, fd), ...]} of every visible descriptor on any of
    ``inodes``, found in one pass over /proc whatever their number."""
    found = dict((inode, []) for inode in inodes)
    try:
        pids = [int(name) for name in os.listdir('/proc') if name.isdigit()]
    except OSError:
        return found
    for pid in sorted(pids):
        fd_dir = '/proc/%d/fd' % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # exited, or another user's process and we are not root
        for fd in fds:
            link = '%s/%s' % (fd_dir, fd)
            try:
                # Sockets, pipes and anonymous inodes ('socket:[123]') cannot
                # be the image; skipping them saves most stat calls.
                if not os.readlink(link).startswith('/'):
                    continue
                st = os.stat(link)
            except OSError:
                continue
            hits = found.get((st.st_dev, st.st_ino))
            if hits is not None:
                hits.append((pid, fd))
    return found


def disk_holders_of(paths, include_readers=False):
    """{path: holders} for many image files, with one pass over /proc;
    each value as disk_holders() returns it."""
    inodes = {}
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
    descriptors = _open_descriptors(list(inodes))
    result = dict((path, []) for path in paths)
    for inode, names in inodes.items():
        holders = []
        for pid, fd in descriptors.get(inode, ()):
            info = _fdinfo(pid, fd)
            if info is None:
                continue
            writable, locks = info
            if not (include_readers or writable or locks):
                continue
            holders.append({'pid': pid, 'command': _command(pid), 'fd': int(fd),
                            'writable': writable, 'locks': locks})
        for name in names:
            result[name] = holders
    return result


def disk_holders(path, include_readers=False):
    """Processes using the image file at ``path``.

    Returns a list of dicts ``{pid, command, fd, writable, locks}``: every
    process with a descriptor on the file that holds a lock in QEMU's range
    through it or has it open for writing (with ``include_readers``, every
    process that has it open at all).  ``command`` is the program's base
    name; ``locks`` are the kernel's lines for that descriptor's locks in
    QEMU's range.  Empty when the file does not exist.
    """
    return disk_holders_of([path], include_readers)[path]


def is_in_use(path):
    """True when a live process holds QEMU's image lock on ``path`` or has it
    open for writing.  Cheap: one fcntl when a lock is held, otherwise a walk
    of /proc descriptors without opening any file."""
    if is_locked(path):
        return True
    return bool(disk_holders(path))


def describe_holders(holders):
    """'pid 123 (qemu-system-x86_64, writing), ...' for messages."""
    parts = []
    for holder in holders:
        notes = [holder['command']]
        if holder['locks']:
            notes.append('locked')
        if holder['writable']:
            notes.append('open for writing')
        parts.append('pid %d (%s)' % (holder['pid'], ', '.join(notes)))
    return ', '.join(parts)


def usage_report(path):
    """(in_use, holders, lock description) for ``path`` in one pass."""
    return usage_reports([path])[path]


def usage_reports(paths):
    """{path: (in_use, holders, lock description)} with one pass over /proc."""
    holders = disk_holders_of(paths)
    result = {}
    for path in paths:
        found = locked_bytes(path)
        result[path] = (bool(found or holders[path]), holders[path], describe_locks(found))
    return result


def ensure_not_in_use(paths, action):
    """Raise ImageInUseError naming the holders if any of ``paths`` is in use.

    ``action`` completes the message: 'cannot <action>: ...'.  Returns None.
    """
    for path in paths:
        in_use, holders, locks = usage_report(path)
        if not in_use:
            continue
        if holders:
            who = 'in use by %s' % describe_holders(holders)
        else:
            who = 'in use by a process this user cannot see'
        detail = ' (QEMU image lock: %s)' % locks if locks else ''
        error = ImageInUseError('cannot %s: %s is %s%s; stop the VM (or program) first'
                                % (action, path, who, detail))
        error.holders = holders
        raise error
