# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A real, paused qemu-system-x86_64 holding a disk open, for the in-use tests.

    from support.qemu_process import QEMU, start_qemu, stop_qemu

Shared through tests/support rather than imported from a sibling test module:
``ansible-test units`` imports test modules as collection packages, so a test
folder is not on sys.path there the way pytest's default import mode puts it.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import shutil
import signal
import subprocess
import time

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu import image_locks as qemu_locks
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.image_locks import locked_bytes

QEMU = shutil.which('qemu-system-x86_64')


def start_qemu(disk, attach=False, fmt='raw', readonly=False, timeout=15):
    """Start a paused QEMU with ``disk`` open and wait until it holds its
    image lock (with ``attach``, until it holds the write permission too).
    Returns the Popen; the caller must stop_qemu() it."""
    drive = 'file=%s,format=%s,if=none,id=d0' % (disk, fmt)
    if readonly:
        drive += ',readonly=on'
    argv = [QEMU, '-nodefaults', '-nographic', '-display', 'none', '-accel', 'tcg', '-S',
            '-monitor', 'none', '-serial', 'none', '-drive', drive]
    if attach:
        argv = argv[:1] + ['-machine', 'pc', '-m', '16'] + argv[1:] + ['-device', 'virtio-blk-pci,drive=d0']
    else:
        argv = argv[:1] + ['-machine', 'none'] + argv[1:]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    want = qemu_locks.QEMU_PERM_BASE + 1 if attach and not readonly else qemu_locks.QEMU_PERM_BASE
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError('qemu exited with %s: %s' % (proc.returncode, proc.stderr.read()[-2000:]))
            if any(offset == want for offset, _kind in locked_bytes(disk)):
                return proc
            if time.monotonic() > deadline:
                raise AssertionError('qemu did not lock %s within %s s' % (disk, timeout))
            time.sleep(0.02)
    except BaseException:
        stop_qemu(proc)
        raise


def stop_qemu(proc, sig=signal.SIGKILL):
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=30)
    if proc.stderr:
        proc.stderr.close()
