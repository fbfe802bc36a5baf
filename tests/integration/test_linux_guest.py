"""A real Linux guest, end to end: a Debian 12 image built from Debian's
packages (tests/support/linux_guest.py, cached between runs), served on
loopback, fetched with vm_image_fetch, an instance made with
vm_image_instance, booted with exactly the instance's qemu_args under the
accelerator the module chose, and a marker printed from the guest's
userland that carries the instance's uuid and MAC.

On hosts where KVM opens but cannot run a real bootloader this is the test
that shows the fallback works: a boot sector still runs there."""

import os
import signal
import subprocess

import pytest

from support.ansible_run import run_playbook
from support.http_server import LocalHTTPServer
from support.linux_guest import (
    cached_guest_archive, guest_qemu_args, host_sources, missing_tools, parse_guest_lines,
)

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive

# TCG boots Debian to userland in ~35-45 s on 2 cores; leave room for a loaded CI host.
BOOT_TIMEOUT = 300

pytestmark = pytest.mark.skipif(
    bool(missing_tools()) or host_sources() is None or os.geteuid() != 0,
    reason='building the guest needs root, apt sources and %s' % ', '.join(missing_tools() or ['nothing else']))


def _pack(folder, out_path):
    with open(out_path, 'wb') as out:
        write_image_archive(folder, out)
        out.flush()
        os.fsync(out.fileno())


@pytest.fixture(scope='module')
def guest_archive():
    return cached_guest_archive(_pack)


def test_real_linux_guest_boots_from_the_instances_qemu_args(tmp_path, guest_archive):
    store = str(tmp_path / 'store')
    with LocalHTTPServer() as srv:
        url = srv.add('/debian/image.tar.zst', file=guest_archive)
        run = run_playbook([
            {'vmimage.qemu.vm_image_fetch': dict(url=url, image_id='debian', store=store)},
            {'vmimage.qemu.vm_image_instance': dict(name='guest-1', image='debian', store=store)},
            {'vmimage.qemu.vm_host_info': {}},
        ], tmp_path)
    fetched, instance, host = run.results
    assert fetched['changed'] is True, fetched
    assert instance['accel'] == host['accelerator'], 'one decision for the host facts and the instance'

    log = str(tmp_path / 'serial.log')
    argv = instance['qemu_args'] + guest_qemu_args(log)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _out, err = proc.communicate(timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _out, err = proc.communicate()
    serial = open(log, errors='replace').read() if os.path.exists(log) else ''
    context = 'accel %s (%s); QEMU exit %s; stderr %s; serial tail %r' % (
        instance['accel'], instance['accel_reason'], proc.returncode, err.decode('utf-8', 'replace')[-2000:],
        serial[-3000:])
    assert parse_guest_lines(serial) == [(instance['uuid'], instance['mac'])], context
    assert proc.returncode == 0, 'the guest powered itself off: ' + context
