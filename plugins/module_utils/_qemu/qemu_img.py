# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Running qemu-img on untrusted files, always the safe way.

Rules every call here follows:

* argv lists only, never a shell; paths are made absolute so that no file
  name can be read as an option (``-...``) or as a protocol (``nbd:``,
  ``json:{...}``): QEMU only looks for a protocol before the first ``/``.
* the image format is always explicit (``-f``): probing is how format
  confusion attacks work (CVE-2008-2004, CVE-2024-40767).
* the child runs with RLIMIT_CPU, RLIMIT_AS and no core dumps, in its own
  session, under a wall-clock timeout, with a minimal ``LC_ALL=C``
  environment, so a crafted file can neither exhaust the host nor hang us.
* output is collected in temporary files and read back bounded.

``validate_with_qemu_img`` is defence in depth: it runs the pure-Python checks
(format_probe, qcow2) first, so qemu-img never opens a file those rejected,
and then cross-checks what qemu-img itself reports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import collections
import json
import os
import re
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import uuid

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    LimitExceededError, NoSpaceError, PermissionDeniedError, QemuImgError, UnsafeImageError,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.format_probe import check_raw_disk
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import DEFAULT_LIMITS
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.qcow2 import (
    check_layer_file, describe_backing_risk,
)

DISK_NAME = 'disk.img'
LAYER_NAME = 'layer.qcow2'

# qemu-img's JSON for one image is a few KiB; anything near this is hostile.
MAX_STDOUT = 16 * 1024 * 1024
_STDERR_TAIL_BYTES = 64 * 1024
_STDERR_TAIL_LINES = 8
# Extra wall-clock time beyond the CPU budget: qemu-img may also wait on I/O.
_TIMEOUT_SLACK = 30

_FORMAT_NAME = re.compile(r'^[a-z0-9][a-z0-9_-]{0,31}$')
_OPTION_KEY = re.compile(r'^[a-z0-9][a-z0-9_.-]{0,63}$')
# Options create_overlay sets itself, or that would produce what check_layer
# refuses.
_FORBIDDEN_CREATE_OPTIONS = frozenset((
    'backing_file', 'backing_fmt', 'data_file', 'data_file_raw', 'encryption', 'encrypt.format',
))
_MEMORY_HINTS = re.compile(
    r'cannot allocate memory|out of memory|failed to allocate|qemu_thread_create|'
    r'failed to map segment|resource temporarily unavailable', re.IGNORECASE)
# strerror texts (LC_ALL=C) in qemu-img's messages that say the file system,
# not the image, is the problem: reported with the kind an operator acts on.
_OS_FAILURES = (
    (re.compile(r'No space left on device|Disk quota exceeded'), NoSpaceError),
    (re.compile(r'Permission denied|Read-only file system|Operation not permitted'), PermissionDeniedError),
)
_MEMORY_SIGNALS = frozenset(getattr(signal, n) for n in ('SIGABRT', 'SIGSEGV', 'SIGBUS', 'SIGTRAP')
                            if hasattr(signal, n))

QemuImgResult = collections.namedtuple('QemuImgResult', 'argv returncode stdout stderr')
"""What run_qemu_img returns: argv (list), returncode (int), stdout and stderr (str)."""


def find_qemu_img():
    """Return the path of qemu-img on PATH, or raise QemuImgError."""
    path = shutil.which('qemu-img')
    if not path:
        raise QemuImgError('qemu-img not found; install qemu-utils')
    return path


def _human_bytes(n):
    for unit, size in (('GiB', 1024 ** 3), ('MiB', 1024 ** 2), ('KiB', 1024)):
        if n >= size and n % size == 0:
            return '%d %s' % (n // size, unit)
    return '%d bytes' % n


def _capped(requested, kind):
    """(soft, hard) for a new rlimit: never above the current hard limit,
    which an unprivileged process cannot raise."""
    _soft, hard = resource.getrlimit(kind)
    if hard == resource.RLIM_INFINITY:
        return requested
    return min(requested[0], hard), min(requested[1], hard)


def _limit_setter(limits):
    cpu = int(limits.qemu_img_cpu_seconds)
    memory = int(limits.qemu_img_memory)
    # Soft CPU limit delivers SIGXCPU (a clear signal to report); the hard
    # limit one second later is SIGKILL in case the child ignores it.
    settings = [
        (resource.RLIMIT_CPU, _capped((cpu, cpu + 1), resource.RLIMIT_CPU)),
        (resource.RLIMIT_AS, _capped((memory, memory), resource.RLIMIT_AS)),
        # A crashing qemu-img must not leave a core dump of untrusted data.
        (resource.RLIMIT_CORE, (0, 0)),
    ]

    def _apply():
        # Runs in the child between fork and exec: only setrlimit calls, all
        # values computed beforehand in the parent.
        for kind, values in settings:
            resource.setrlimit(kind, values)

    return _apply


def _child_env():
    env = {'LC_ALL': 'C', 'LANG': 'C', 'PATH': os.environ.get('PATH') or os.defpath}
    # TMPDIR is honoured for qemu-img's temporary files; nothing else from our
    # environment (QEMU_*, G_*, MALLOC_*) should steer the child.
    if os.environ.get('TMPDIR'):
        env['TMPDIR'] = os.environ['TMPDIR']
    return env


def _display(argv):
    return ' '.join(shlex.quote(a) for a in ['qemu-img'] + list(argv[1:]))


def _stderr_tail(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return ' | '.join(lines[-_STDERR_TAIL_LINES:])


def _read_tail(fileobj, size):
    fileobj.seek(0, os.SEEK_END)
    end = fileobj.tell()
    fileobj.seek(max(0, end - size))
    return fileobj.read().decode('utf-8', 'replace')


def _failure_message(argv, returncode, stderr, limits):
    if returncode < 0:
        signum = -returncode
        try:
            signame = signal.Signals(signum).name
        except ValueError:
            signame = 'signal %d' % signum
        what = 'killed by %s' % signame
        if signum == getattr(signal, 'SIGXCPU', None):
            what += ': CPU limit of %d s reached' % limits.qemu_img_cpu_seconds
        elif signum == signal.SIGKILL:
            what += ' (hard CPU limit of %d s reached, or killed from outside)' \
                % (limits.qemu_img_cpu_seconds + 1)
        elif signum in _MEMORY_SIGNALS:
            what += ' (the address-space limit of %s may have been reached)' \
                % _human_bytes(limits.qemu_img_memory)
    else:
        what = 'exit status %d' % returncode
        if _MEMORY_HINTS.search(stderr):
            what += ' (the address-space limit of %s may have been reached)' \
                % _human_bytes(limits.qemu_img_memory)
    tail = _stderr_tail(stderr)
    return '%s failed: %s%s' % (_display(argv), what, ': %s' % tail if tail else '')


def run_qemu_img(args, limits=DEFAULT_LIMITS, timeout=None, check=True, qemu_img=None,
                 max_output=MAX_STDOUT):
    """Run ``qemu-img <args>`` under resource limits; return a QemuImgResult.

    ``args`` is a list of strings (or path-likes), never a shell string.  The
    child gets RLIMIT_CPU = limits.qemu_img_cpu_seconds (SIGXCPU), RLIMIT_AS =
    limits.qemu_img_memory, no core dumps, LC_ALL=C, and is killed (with its
    session) after ``timeout`` wall-clock seconds (default: CPU limit + 30 s).
    QemuImgError on a missing binary, a timeout, a signal, oversized output,
    or (with check=True) a nonzero exit status.
    """
    if isinstance(args, (str, bytes)):
        raise TypeError('run_qemu_img takes an argument list, never a command string')
    argv = [qemu_img or find_qemu_img()]
    for arg in args:
        arg = os.fspath(arg)
        if isinstance(arg, bytes):
            arg = os.fsdecode(arg)
        if not isinstance(arg, str) or '\x00' in arg:
            raise ValueError('invalid qemu-img argument %r' % (arg,))
        argv.append(arg)
    if timeout is None:
        timeout = limits.qemu_img_cpu_seconds + _TIMEOUT_SLACK

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=_child_env(),
                close_fds=True, start_new_session=True, preexec_fn=_limit_setter(limits))
        except FileNotFoundError:
            raise QemuImgError('qemu-img not found at %s; install qemu-utils' % argv[0])
        except (OSError, subprocess.SubprocessError) as exc:
            raise QemuImgError('%s could not be started: %s' % (_display(argv), exc))
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_session(proc)
            raise QemuImgError('%s failed: timed out after %s s (wall clock) and was killed'
                               % (_display(argv), timeout))
        except BaseException:
            # Interrupted (KeyboardInterrupt, ...): never leave it running.
            _kill_session(proc)
            raise

        stderr = _read_tail(err, _STDERR_TAIL_BYTES)
        out_size = out.seek(0, os.SEEK_END)
        if out_size > max_output:
            raise QemuImgError('%s failed: output of %d bytes exceeds the limit of %d bytes'
                               % (_display(argv), out_size, max_output))
        out.seek(0)
        stdout = out.read().decode('utf-8', 'replace')

    if returncode < 0 or (check and returncode != 0):
        error_class = QemuImgError
        if returncode > 0:
            for pattern, cls in _OS_FAILURES:
                if pattern.search(stderr):
                    error_class = cls
                    break
        raise error_class(_failure_message(argv, returncode, stderr, limits))
    return QemuImgResult(argv, returncode, stdout, stderr)


def _kill_session(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except OSError:
        pass
    proc.wait()


def _check_format_name(fmt, what='format'):
    if not fmt:
        raise ValueError('qemu-img needs an explicit %s: probing is format confusion' % what)
    if not isinstance(fmt, str) or not _FORMAT_NAME.match(fmt):
        raise ValueError('invalid %s %r' % (what, fmt))
    return fmt


def _safe_path(path):
    # Absolute: cannot start with '-' (option) and has '/' before any ':'
    # (QEMU would otherwise take 'nbd:...' or 'json:{...}' as a protocol).
    return os.path.abspath(os.fsdecode(os.fspath(path)))


def qemu_img_info(path, fmt, limits=DEFAULT_LIMITS, force_share=True, backing_chain=False,
                  timeout=None, qemu_img=None):
    """Return ``qemu-img info -f <fmt> --output json [-U] <path>`` parsed.

    ``fmt`` is mandatory (ValueError without it).  ``force_share`` (-U) is on
    by default: cached images are read-only and may be open by running VMs,
    whose write lock would otherwise make info fail.  Without
    ``backing_chain`` qemu-img does not open the backing file at all (the
    caller validates it separately) and a dict is returned; with it, a list.
    """
    fmt = _check_format_name(fmt)
    args = ['info', '-f', fmt, '--output', 'json']
    if force_share:
        args.append('-U')
    if backing_chain:
        args.append('--backing-chain')
    args.append(_safe_path(path))
    result = run_qemu_img(args, limits=limits, timeout=timeout, qemu_img=qemu_img)
    try:
        info = json.loads(result.stdout)
    except ValueError as exc:
        raise QemuImgError('%s returned unparsable JSON: %s' % (_display(result.argv), exc))
    expected = list if backing_chain else dict
    if not isinstance(info, expected):
        raise QemuImgError('%s returned JSON %s, expected %s'
                           % (_display(result.argv), type(info).__name__, expected.__name__))
    return info


def _require_regular(path, name):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafeImageError('%s: missing' % name)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeImageError('%s: is not a regular file (mode %s)'
                               % (name, stat.filemode(st.st_mode)))
    return st


def _check_disk_info(info, name, limits):
    if info.get('format') != 'raw':
        raise UnsafeImageError('%s: qemu-img reports format %r, expected raw'
                               % (name, info.get('format')))
    for key in ('backing-filename', 'full-backing-filename', 'backing-filename-format'):
        if key in info:
            raise UnsafeImageError('%s: qemu-img reports a backing file (%s %r); a raw disk '
                                   'has none' % (name, key, info[key]))
    if info.get('dirty-flag'):
        raise UnsafeImageError('%s: qemu-img reports the dirty flag set' % name)
    virtual = info.get('virtual-size')
    if not isinstance(virtual, int):
        raise QemuImgError('%s: qemu-img reports no virtual size' % name)
    if virtual > limits.max_member_size:
        raise LimitExceededError('%s: virtual size %d bytes exceeds the limit of %d bytes'
                                 % (name, virtual, limits.max_member_size))


def _check_layer_info(info, name, layer_path, disk_name, limits):
    if info.get('format') != 'qcow2':
        raise UnsafeImageError('%s: qemu-img reports format %r, expected qcow2'
                               % (name, info.get('format')))
    backing = info.get('backing-filename')
    if backing != disk_name:
        risk = describe_backing_risk(backing) if isinstance(backing, str) else ''
        raise UnsafeImageError('%s: qemu-img reports backing file %r, expected exactly %r%s'
                               % (name, backing, disk_name, ' (%s)' % risk if risk else ''))
    full = info.get('full-backing-filename')
    expected_full = os.path.join(os.path.dirname(layer_path), disk_name)
    if full is not None and os.path.normpath(full) != os.path.normpath(expected_full):
        raise UnsafeImageError('%s: qemu-img resolves the backing file to %r, expected %r'
                               % (name, full, expected_full))
    if info.get('backing-filename-format') != 'raw':
        raise UnsafeImageError('%s: qemu-img reports backing format %r, expected exactly raw'
                               % (name, info.get('backing-filename-format')))
    if info.get('dirty-flag'):
        raise UnsafeImageError('%s: qemu-img reports the dirty flag set' % name)
    if info.get('encrypted'):
        raise UnsafeImageError('%s: qemu-img reports the image is encrypted' % name)
    if info.get('snapshots'):
        raise UnsafeImageError('%s: qemu-img reports %d internal snapshot(s)'
                               % (name, len(info['snapshots'])))
    specific = info.get('format-specific') or {}
    data = specific.get('data') or {}
    if specific.get('type') != 'qcow2':
        raise UnsafeImageError('%s: qemu-img reports no qcow2-specific data' % name)
    if data.get('corrupt'):
        raise UnsafeImageError('%s: qemu-img reports the corrupt flag set' % name)
    if 'data-file' in data or data.get('data-file-raw'):
        raise UnsafeImageError('%s: qemu-img reports external data file %r (CVE-2024-32498)'
                               % (name, data.get('data-file')))
    if 'encrypt' in data:
        raise UnsafeImageError('%s: qemu-img reports qcow2 encryption' % name)
    if data.get('compat') != '1.1':
        raise UnsafeImageError('%s: qemu-img reports compat %r, expected 1.1 (qcow2 v3)'
                               % (name, data.get('compat')))
    if data.get('extended-l2'):
        raise UnsafeImageError('%s: qemu-img reports extended L2 entries' % name)
    if data.get('bitmaps'):
        raise UnsafeImageError('%s: qemu-img reports persistent bitmaps' % name)
    virtual = info.get('virtual-size')
    if not isinstance(virtual, int):
        raise QemuImgError('%s: qemu-img reports no virtual size' % name)
    if virtual > limits.max_virtual_size:
        raise LimitExceededError('%s: virtual size %d bytes exceeds the limit of %d bytes'
                                 % (name, virtual, limits.max_virtual_size))


def validate_with_qemu_img(folder, limits=DEFAULT_LIMITS, precheck=True, qemu_img=None,
                           disk_name=DISK_NAME, layer_name=LAYER_NAME):
    """Cross-check an image folder (disk.img + layer.qcow2) with qemu-img.

    Both must be regular files (not symlinks).  With ``precheck`` (the
    default) the pure-Python checks run first, so qemu-img never opens a file
    they reject.  Then ``info -f raw`` on the disk must say raw, no backing,
    not dirty; ``info -f qcow2`` on the layer must say qcow2 v3, backing
    exactly ``disk.img`` of format raw, not dirty/corrupt/encrypted, no data
    file, no snapshots.  Raises UnsafeImageError, LimitExceededError or
    QemuImgError; returns {'disk_virtual_size', 'disk_actual_size',
    'layer_virtual_size', 'layer_actual_size'}.
    """
    folder = _safe_path(folder)
    disk_path = os.path.join(folder, disk_name)
    layer_path = os.path.join(folder, layer_name)
    _require_regular(disk_path, disk_name)
    _require_regular(layer_path, layer_name)
    if precheck:
        check_raw_disk(disk_path, limits=limits, name=disk_name)
        check_layer_file(layer_path, limits=limits, name=layer_name, expected_backing=disk_name,
                         expected_backing_format='raw')

    disk_info = qemu_img_info(disk_path, 'raw', limits=limits, qemu_img=qemu_img)
    _check_disk_info(disk_info, disk_name, limits)
    layer_info = qemu_img_info(layer_path, 'qcow2', limits=limits, qemu_img=qemu_img)
    _check_layer_info(layer_info, layer_name, layer_path, disk_name, limits)
    return {
        'disk_virtual_size': disk_info['virtual-size'],
        'disk_actual_size': disk_info.get('actual-size'),
        'layer_virtual_size': layer_info['virtual-size'],
        'layer_actual_size': layer_info.get('actual-size'),
    }


def _option_string(options):
    parts = []
    for key in sorted(options):
        value = options[key]
        if not isinstance(key, str) or not _OPTION_KEY.match(key):
            raise ValueError('invalid qemu-img create option name %r' % (key,))
        if key in _FORBIDDEN_CREATE_OPTIONS or key.startswith('encrypt.'):
            raise ValueError('qemu-img create option %r is not allowed here' % key)
        if isinstance(value, bool):
            value = 'on' if value else 'off'
        value = str(value)
        if '\x00' in value or '\n' in value:
            raise ValueError('invalid value for qemu-img create option %r' % key)
        # QemuOpts syntax: a literal comma inside a value is written twice.
        parts.append('%s=%s' % (key, value.replace(',', ',,')))
    return ','.join(parts)


def _check_backing_reference(backing_path):
    backing = os.fsdecode(os.fspath(backing_path))
    if not backing:
        raise ValueError('backing_path must not be empty')
    if len(backing.encode('utf-8')) > 1023:
        raise ValueError('backing_path longer than the 1023 bytes qcow2 can store')
    risk = describe_backing_risk(backing)
    # A plain relative name, a path with directories or an absolute path are
    # all fine for an overlay we create ourselves; what QEMU would reinterpret
    # (json:, protocols, control characters) is not.
    if risk and not (backing.startswith('/') or risk.startswith('path with') or
                     risk.startswith('parent-directory')):
        raise ValueError('backing_path %r refused: %s' % (backing, risk))
    if backing.startswith('-'):
        raise ValueError('backing_path %r would be read as an option' % backing)
    return backing


def create_overlay(path, backing_path, backing_format, fmt='qcow2', extra_options=None,
                   limits=DEFAULT_LIMITS, size=None, qemu_img=None, timeout=None):
    """Create an overlay ``path`` over ``backing_path`` of ``backing_format``.

    Runs ``qemu-img create -f <fmt> -F <backing_format> -b <backing_path>
    [-o ...] <path> [size]``; the backing format is mandatory and always
    explicit.  ``backing_path`` is stored verbatim (a relative name resolves
    against the overlay's folder, as QEMU does).  ``extra_options`` is a dict
    of -o options; None means ``lazy_refcounts=on`` for qcow2, as the original
    packager did.  The file is created under a temporary name in the same
    folder and hard-linked into place, so ``path`` never exists half-written
    and an existing ``path`` is never overwritten (FileExistsError).  Returns
    the apparent size in bytes of the new file.
    """
    fmt = _check_format_name(fmt)
    backing_format = _check_format_name(backing_format, 'backing format')
    backing = _check_backing_reference(backing_path)
    if extra_options is None:
        extra_options = {'lazy_refcounts': 'on'} if fmt == 'qcow2' else {}
    options = _option_string(extra_options)
    path = _safe_path(path)
    if os.path.lexists(path):
        raise FileExistsError('%s already exists; refusing to overwrite it' % path)
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, '.%s.%s.tmp' % (base, uuid.uuid4().hex))
    # Claim the temporary name exclusively before qemu-img writes to it.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_CLOEXEC', 0),
                     0o644))
    try:
        args = ['create', '-q', '-f', fmt, '-F', backing_format, '-b', backing]
        if options:
            args += ['-o', options]
        args.append(tmp)
        if size is not None:
            args.append(str(int(size)))
        # qemu-img resolves a relative backing name against the new image's
        # folder, which is the same for the temporary name.
        run_qemu_img(args, limits=limits, qemu_img=qemu_img, timeout=timeout)
        os.link(tmp, path)
        return os.stat(path).st_size
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
