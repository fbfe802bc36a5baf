# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""What a hypervisor host offers this process: KVM, QEMU, Python libraries.

* probe_kvm(): opens the KVM device read-write and asks KVM_GET_API_VERSION,
  as QEMU does first; a failure comes with one sentence saying why (missing
  device, permission with the device's owner/mode and this process's groups,
  no driver, wrong API version, ioctl error).  Passing it is necessary, not
  sufficient: accelerator.py then tries QEMU itself.
* qemu_versions(): ``--version`` of qemu-system-x86_64 and qemu-img (argv,
  short timeout; a missing or broken binary gives None).
* python_libraries(): whether zstandard and requests import, with versions.

Nothing here raises for a host that lacks something: a report is the point.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import fcntl
import grp
import importlib
import os
import platform
import pwd
import re
import shutil
import stat
import subprocess
import sys

KVM_DEVICE = '/dev/kvm'
# _IO(KVMIO, 0x00): the first ioctl any KVM user makes; the answer is fixed at 12.
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12

QEMU_SYSTEM = 'qemu-system-x86_64'
QEMU_IMG = 'qemu-img'
VERSION_TIMEOUT = 10
# Where Debian/Ubuntu put the binaries, searched after PATH: a module may run
# with a minimal PATH (cron, become without a login shell).
_EXTRA_PATH = ('/usr/local/bin', '/usr/bin', '/bin', '/usr/local/sbin', '/usr/sbin', '/sbin')
_VERSION = re.compile(r'\bversion\s+(\d+(?:\.\d+)+)')

PYTHON_LIBRARIES = ('zstandard', 'requests')


class KvmStatus(object):
    """The outcome of probe_kvm(): ``usable``, ``reason`` ('ok' when
    usable), ``device`` and ``api_version`` (None unless the ioctl answered)."""

    __slots__ = ('usable', 'reason', 'device', 'api_version')

    def __init__(self, usable, reason, device, api_version=None):
        self.usable = usable
        self.reason = reason
        self.device = device
        self.api_version = api_version

    def as_dict(self):
        return dict(usable=self.usable, reason=self.reason, device=self.device, api_version=self.api_version)

    def __repr__(self):
        return 'KvmStatus(%r)' % (self.as_dict(),)


def _group_name(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def describe_permission_denied(device, st, uid=None, groups=None):
    """Why this process (``uid``, ``groups``: defaults to its own) may not
    open ``device`` (stat result ``st``) read-write."""
    uid = os.geteuid() if uid is None else uid
    if groups is None:
        groups = set(os.getgroups()) | {os.getegid()}
    group = _group_name(st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    head = 'permission denied opening %s read-write (owner %s, group %s, mode %04o): ' % (
        device, _user_name(st.st_uid), group, mode)
    who = 'this process (user %s)' % _user_name(uid)
    outside = ('an access control outside the file mode (a container device policy, SELinux/AppArmor, '
               'a nodev mount) refuses it')
    if uid == 0:
        return head + 'root is refused, so ' + outside
    if uid == st.st_uid:
        if mode & 0o600 != 0o600:
            return head + '%s owns it but the owner has no read-write access' % who
        return head + '%s owns it and the mode allows read-write: %s' % (who, outside)
    if st.st_gid in groups:
        if mode & 0o060 != 0o060:
            return head + ('%s is in group %s but the group has no read-write access; '
                           'the device mode should be 0660' % (who, group))
        return head + '%s is in group %s and the mode allows read-write: %s' % (who, group, outside)
    if mode & 0o006 == 0o006:
        return head + 'the mode allows read-write to everyone: %s' % outside
    if mode & 0o060 == 0o060:
        return head + ('%s is not in group %s; add the user to that group (takes effect at the next login)'
                       % (who, group))
    return head + ('%s is not in group %s, and that group has no read-write access either; give the device '
                   'a group with mode 0660 (the vmimage.qemu.hypervisor role does) and add the user to it'
                   % (who, group))


def api_version_reason(device, version):
    """None when ``version`` is the one KVM API there is, else why not."""
    if version == KVM_API_VERSION:
        return None
    return 'KVM_GET_API_VERSION on %s returned %r, expected %d: unsupported kernel KVM API' % (
        device, version, KVM_API_VERSION)


def _open_error_reason(device, exc):
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    if exc.errno == errno.ENOENT:
        return ('%s does not exist: the kvm kernel module is not loaded, the CPU has no hardware '
                'virtualisation (or it is disabled in firmware / not nested), or the device is not passed '
                'to this container' % device)
    if exc.errno in (errno.EACCES, errno.EPERM):
        try:
            st = os.stat(device)
        except OSError:
            return 'permission denied opening %s read-write (%s)' % (device, name)
        return describe_permission_denied(device, st)
    if exc.errno in (errno.ENXIO, errno.ENODEV):
        return ('%s exists but no driver answers (%s): the kvm module is not loaded or the CPU has no '
                'hardware virtualisation' % (device, name))
    return 'cannot open %s read-write: %s (%s)' % (device, exc.strerror or name, name)


def probe_kvm(device=KVM_DEVICE):
    """Whether this process can use KVM through ``device``: a KvmStatus."""
    device = os.fsdecode(os.fspath(device))
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmStatus(False, _open_error_reason(device, exc), device)
    try:
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            hint = ': not a KVM device' if exc.errno in (errno.ENOTTY, errno.EINVAL) else ''
            return KvmStatus(False, 'ioctl KVM_GET_API_VERSION on %s failed: %s (%s)%s'
                             % (device, exc.strerror or name, name, hint), device)
    finally:
        os.close(fd)
    reason = api_version_reason(device, version)
    return KvmStatus(reason is None, reason or 'ok', device, version)


def find_binary(name, path=None):
    """Absolute path of ``name`` on ``path`` (default: PATH, then the usual
    system folders), or None."""
    if path is None:
        path = os.pathsep.join([os.environ.get('PATH', '')] + list(_EXTRA_PATH))
    return shutil.which(name, path=path)


def parse_version(text):
    """The dotted version of a ``--version`` banner ('QEMU emulator version
    7.2.22 (Debian ...)' -> '7.2.22'), or None."""
    match = _VERSION.search(text or '')
    return match.group(1) if match else None


def binary_version(binary, timeout=VERSION_TIMEOUT):
    """``binary --version`` parsed by parse_version(); None when it cannot run,
    fails, times out or prints no version."""
    if binary is None:
        return None
    env = dict(os.environ, LC_ALL='C')
    try:
        proc = subprocess.run([binary, '--version'], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=env, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return parse_version(proc.stdout.decode('utf-8', 'replace'))


def qemu_versions(path=None, timeout=VERSION_TIMEOUT):
    """The QEMU binaries and their versions (None where missing)."""
    system = find_binary(QEMU_SYSTEM, path)
    img = find_binary(QEMU_IMG, path)
    return dict(system_binary=system, system_version=binary_version(system, timeout),
                img_binary=img, img_version=binary_version(img, timeout))


def library_version(name):
    """The version of Python library ``name`` when it imports, else None."""
    try:
        lib = importlib.import_module(name)
    except Exception:  # pylint: disable=broad-except
        # A broken install raises anything at import time; all mean "unusable".
        return None
    return str(getattr(lib, '__version__', None) or 'unknown')


def python_libraries(names=PYTHON_LIBRARIES):
    """This interpreter and the versions of the libraries the modules need."""
    result = dict(version=platform.python_version(), executable=sys.executable)
    for name in names:
        result[name] = library_version(name)
    return result
