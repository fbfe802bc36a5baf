# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Which accelerator a VM gets on this host, decided by trying it.

A ``/dev/kvm`` that opens and answers KVM_GET_API_VERSION proves little: on
some hosts ``qemu-system-x86_64 -accel kvm -cpu host`` aborts at start ("failed
to set MSR 0x10a", an assertion in kvm_buf_set_msrs), paused or not.  So
``auto`` launches QEMU itself, paused (``-S``), with no devices, and with
exactly the machine type, accelerator and CPU model the instance's command
line will carry, asks it over QMP whether KVM is enabled, and counts KVM only
when that process answers.  Otherwise the VM gets TCG with ``-cpu max``, and
the decision says why.

An explicit ``kvm`` or ``tcg`` is taken as asked: the operator knows better
than a probe, and a wrong choice then fails loudly at VM start.

The verdict costs a QEMU start (~0.1-0.3 s), so it is cached per host in a
runtime folder (``/run/vmimage-qemu`` for root, ``$XDG_RUNTIME_DIR`` for other
users, nothing when neither is safe), keyed by everything that can change it:
the QEMU binary's identity (an upgrade replaces the file), the kernel release,
the boot id (so it never survives a reboot), the KVM device node, this
process's user and groups, the machine type and CPU model.  A cache entry that
does not parse or does not match its key is ignored and probed again.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
import stat
import subprocess

from ansible_collections.vmimage.qemu.plugins.module_utils._core.fs import write_json_atomic
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.host_probe import (
    KVM_DEVICE, QEMU_SYSTEM, find_binary, probe_kvm,
)

ACCELERATORS = ('auto', 'kvm', 'tcg')
DEFAULT_MACHINE_TYPE = 'pc-i440fx-2.8'
DEFAULT_CPU = 'host'
# TCG emulates: it cannot pass the host CPU through, and 'max' is the closest.
TCG_CPU = 'max'
PROBE_TIMEOUT = 30
# QEMU's complaint is kept whole enough to act on, never unbounded.
MAX_ERROR_TEXT = 2000
CACHE_VERSION = 1
ROOT_CACHE_DIR = '/run/vmimage-qemu'
_CACHE_SUBDIR = 'vmimage-qemu'
_BOOT_ID = '/proc/sys/kernel/random/boot_id'

# Sent before QEMU reads anything: the commands queue on stdin and run in order
# once its main loop starts, which is after the vCPUs were created and reset
# (where the broken hosts abort).
_QMP_SCRIPT = (
    '{"execute": "qmp_capabilities"}\n'
    '{"execute": "query-kvm", "id": "kvm"}\n'
    '{"execute": "quit"}\n'
)


class AccelDecision(object):
    """The accelerator for a command line and why.

    ``accel`` 'kvm' or 'tcg'; ``cpu`` the CPU model to pass; ``requested``
    what was asked; ``reason`` one sentence; ``kvm`` the device probe as a
    dict (None when not consulted); ``qemu_error`` QEMU's own words when the
    KVM trial failed; ``cached`` whether the verdict came from the cache.
    """

    __slots__ = ('accel', 'cpu', 'requested', 'reason', 'kvm', 'qemu_error', 'cached')

    def __init__(self, accel, cpu, requested, reason, kvm=None, qemu_error=None, cached=False):
        self.accel = accel
        self.cpu = cpu
        self.requested = requested
        self.reason = reason
        self.kvm = kvm
        self.qemu_error = qemu_error
        self.cached = cached

    @property
    def fell_back(self):
        return self.requested == 'auto' and self.accel == 'tcg'

    def as_dict(self):
        return dict((name, getattr(self, name)) for name in self.__slots__)

    def __repr__(self):
        return 'AccelDecision(%r)' % (self.as_dict(),)


def cpu_for(accel, cpu):
    """The CPU model QEMU gets for ``cpu`` under ``accel``."""
    return TCG_CPU if accel == 'tcg' and cpu == 'host' else cpu


def _tcg(requested, cpu, reason, kvm=None, qemu_error=None, cached=False):
    return AccelDecision('tcg', cpu_for('tcg', cpu), requested, reason, kvm, qemu_error, cached)


def default_cache_dir():
    """The runtime folder for verdicts, or None when there is no safe one."""
    if os.geteuid() == 0:
        return ROOT_CACHE_DIR
    runtime = os.environ.get('XDG_RUNTIME_DIR')
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, _CACHE_SUBDIR)
    return None


def _private_dir(path):
    """``path`` created if needed; None unless it is a real folder of this
    user that nobody else can write (another user could plant a verdict)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return None
    return path


def _identity(path):
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _boot_id():
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return None


def cache_key(binary, machine_type, cpu, kvm_device):
    """What the KVM verdict depends on; None when part of it cannot be read
    (then the verdict is not cached)."""
    try:
        dev = os.stat(kvm_device)
        binary_id = _identity(binary)
    except OSError:
        return None
    boot_id = _boot_id()
    if boot_id is None:
        return None
    uname = os.uname()
    return dict(
        version=CACHE_VERSION, binary=os.path.realpath(binary), binary_id=binary_id,
        machine_type=machine_type, cpu=cpu, kernel=[uname.release, uname.version, uname.machine],
        boot_id=boot_id, kvm_device=[kvm_device, dev.st_rdev, dev.st_ino, dev.st_mode, dev.st_uid, dev.st_gid,
                                     dev.st_ctime_ns],
        user=[os.geteuid(), os.getegid(), sorted(set(os.getgroups()))],
    )


def _cache_path(cache_dir, key):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode('utf-8')).hexdigest()
    return os.path.join(cache_dir, 'accel-%s.json' % digest[:32])


def _read_cached(path, key):
    """The cached verdict for ``key`` as a dict, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, 'rb') as f:
            data = json.loads(f.read(64 * 1024).decode('utf-8'))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get('key') != key or data.get('usable') not in (True, False):
        return None
    if not isinstance(data.get('reason'), str):
        return None
    if data.get('qemu_error') is not None and not isinstance(data['qemu_error'], str):
        return None
    return data


def _write_cached(path, key, usable, reason, qemu_error):
    try:
        write_json_atomic(path, dict(key=key, usable=usable, reason=reason, qemu_error=qemu_error), mode=0o600)
    except Exception:  # pylint: disable=broad-except
        # The cache only saves time: a full or read-only /run costs a probe, not the decision.
        pass


def _error_text(stderr):
    text = stderr.decode('utf-8', 'replace').strip()
    return text[:MAX_ERROR_TEXT] if text else None


def _qmp_answer(stdout, request_id):
    for line in stdout.decode('utf-8', 'replace').splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get('id') == request_id:
            return message
    return None


def trial_argv(binary, machine_type, cpu):
    """The paused, device-less QEMU that stands in for the instance's."""
    return [binary, '-nodefaults', '-no-user-config', '-machine', machine_type, '-accel', 'kvm',
            '-cpu', cpu, '-m', '64', '-S', '-display', 'none', '-qmp', 'stdio']


def try_kvm(binary, machine_type=DEFAULT_MACHINE_TYPE, cpu=DEFAULT_CPU, timeout=PROBE_TIMEOUT):
    """Start QEMU paused with KVM and ``cpu``: (usable, reason, qemu_error,
    conclusive).  A trial that timed out is not conclusive (a loaded host is
    not a broken one), so it is not cached."""
    what = '%s -machine %s -accel kvm -cpu %s' % (os.path.basename(binary), machine_type, cpu)
    try:
        proc = subprocess.Popen(trial_argv(binary, machine_type, cpu), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd='/',
                                env=dict(os.environ, LC_ALL='C'), close_fds=True)
    except OSError as exc:
        return False, 'cannot start %s to try KVM: %s' % (binary, exc.strerror or exc), None, False
    try:
        stdout, stderr = proc.communicate(_QMP_SCRIPT.encode('ascii'), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        return False, '%s did not answer within %d s' % (what, timeout), _error_text(stderr), False
    answer = _qmp_answer(stdout, 'kvm')
    error = _error_text(stderr)
    if answer is None:
        if proc.returncode < 0:
            how = 'was killed by signal %d' % -proc.returncode
        else:
            how = 'exited with status %d' % proc.returncode
        first = error.splitlines()[0] if error else 'no message'
        return False, '%s %s before answering (%s)' % (what, how, first), error, True
    kvm = answer.get('return')
    if not isinstance(kvm, dict) or kvm.get('enabled') is not True:
        return False, '%s started without KVM enabled (query-kvm: %s)' % (what, json.dumps(answer)), error, True
    return True, 'ok: %s started paused and reported KVM enabled' % what, None, True


def decide_accelerator(accel='auto', cpu=DEFAULT_CPU, machine_type=DEFAULT_MACHINE_TYPE, binary=None,
                       kvm_device=KVM_DEVICE, cache_dir='default', timeout=PROBE_TIMEOUT):
    """The AccelDecision for a VM of ``machine_type`` with ``cpu``.

    ``binary``: the qemu-system-x86_64 the VM will run (default: found on
    PATH); ``cache_dir``: 'default' for default_cache_dir(), None for no
    cache, or a folder.
    """
    if accel not in ACCELERATORS:
        raise ValueError('accel must be one of %s, got %r' % (', '.join(ACCELERATORS), accel))
    if accel == 'tcg':
        return _tcg(accel, cpu, 'requested')
    if accel == 'kvm':
        return AccelDecision('kvm', cpu, accel, 'requested')

    device = probe_kvm(kvm_device)
    kvm = device.as_dict()
    if not device.usable:
        return _tcg(accel, cpu, device.reason, kvm)
    if binary is None or os.sep not in binary:
        name = binary or QEMU_SYSTEM
        binary = find_binary(name)
        if binary is None:
            return _tcg(accel, cpu, 'KVM cannot be tried: %s not found' % name, kvm)

    key = cache_key(binary, machine_type, cpu, kvm_device)
    if cache_dir == 'default':
        cache_dir = default_cache_dir()
    cache_dir = _private_dir(cache_dir) if cache_dir and key is not None else None
    path = _cache_path(cache_dir, key) if cache_dir else None
    cached = _read_cached(path, key) if path else None
    if cached is not None:
        usable, reason, error = cached['usable'], cached['reason'], cached['qemu_error']
    else:
        usable, reason, error, conclusive = try_kvm(binary, machine_type, cpu, timeout)
        if path and conclusive:
            _write_cached(path, key, usable, reason, error)
    if usable:
        return AccelDecision('kvm', cpu, accel, reason, kvm, cached=cached is not None)
    return _tcg(accel, cpu, reason, kvm, error, cached is not None)
