"""Kill a mutable image operation with SIGKILL at a chosen point.

The operation runs in a child Python process that uses the library as the
module does.  A hook replaces one function the operation calls at the point
of interest: it does what the function would start doing (part of the
archive, the disk's file, the extraction), writes a marker file and sleeps;
the parent waits for the marker and sends SIGKILL, so the child dies in the
middle of the operation, with whatever it had made on disk at that moment.

The hooks only patch names that every version of the library has
(``write_image_archive``, ``MutableImage._write_new_file``, the validator's
``extract_image_archive``, ``shutil.rmtree``), so a test that uses them shows
what the library of any version leaves behind.
"""

import os
import signal
import subprocess
import sys
import time

import ansible_collections

_ROOT = os.path.dirname(list(ansible_collections.__path__)[0])

_CHILD = r'''
import os, shutil, sys, time
from ansible_collections.vmimage.qemu.plugins.module_utils._mutable import mutable_image as mi
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest import validator

op, path, arg, marker = sys.argv[1:5]


def stop_here():
    with open(marker, 'w') as f:
        f.write(str(os.getpid()))
    time.sleep(600)


if op == 'pack':
    def write_half(folder, out, **kwargs):
        out.write(b'half an archive' * 4096)
        out.flush()
        stop_here()
    mi.write_image_archive = write_half
    mi.MutableImage(path).package(arg)
elif op == 'create':
    real = mi.MutableImage._write_new_file

    def write_then_stop(folder, name, data=b'', size=None):
        real(folder, name, data=data, size=size)
        stop_here()
    mi.MutableImage._write_new_file = staticmethod(write_then_stop)
    mi.MutableImage.create_blank(path, 1, {'memory': 256})
elif op == 'from_archive':
    real = validator.extract_image_archive

    def extract_then_stop(src, folder, **kwargs):
        real(src, folder, **kwargs)
        stop_here()
    validator.extract_image_archive = extract_then_stop
    mi.MutableImage.create_from_archive(path, arg)
elif op == 'dispose':
    real = shutil.rmtree

    def rmtree_stops(*args, **kwargs):
        # Once the image has vanished (renamed away), its deletion has
        # begun; other removals (collecting debris) run as they would.
        if os.path.lexists(path):
            return real(*args, **kwargs)
        stop_here()
    shutil.rmtree = rmtree_stops
    mi.MutableImage(path).dispose()
else:
    raise SystemExit('unknown operation %s' % op)
raise SystemExit('the operation finished before the hook stopped it')
'''


def kill_mid(op, path, arg, workdir, timeout=60):
    """Run ``op`` ('pack', 'create', 'from_archive', 'dispose') on the
    mutable image ``path`` in a child process and SIGKILL it at the hook.
    ``arg`` is dest (pack) or the archive (from_archive).  ``workdir`` holds
    the script and marker (not the folders under test)."""
    marker = os.path.join(workdir, 'marker-%s-%d' % (op, time.monotonic_ns()))
    script = os.path.join(workdir, 'mutable_crash_child.py')
    with open(script, 'w') as f:
        f.write(_CHILD)
    env = dict(os.environ, PYTHONPATH=_ROOT)
    child = subprocess.Popen([sys.executable, script, op, path, arg or '', marker], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not os.path.exists(marker):
            if child.poll() is not None:
                out, err = child.communicate()
                raise AssertionError('child ended (rc %s) before the hook: %s %s'
                                     % (child.returncode, out.decode(), err.decode()))
            assert time.monotonic() < deadline, 'the hook was never reached'
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    os.unlink(marker)
