# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The demo: the main job of the collection on an embedded default.

1. build a tiny bootable image with vmimage.qemu.vm_image_package
   (demo/build_boot_image.yml),
2. serve it and its SHA256SUMS on 127.0.0.1,
3. apply the hypervisor and image_cache roles to localhost with the store in
   a temporary folder, create two instances, boot one under QEMU and show its
   serial marker, print the store's state (demo/site.yml).

Run through scripts/demo.sh, which sets the machine up first.  Everything it
starts is stopped and everything it creates is removed before it exits, also
when a step fails or the user presses Ctrl-C.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))

from support.http_server import LocalHTTPServer  # noqa: E402  pylint: disable=wrong-import-position

COLLECTIONS = os.path.join(REPO, 'build', 'collections')
BOOT_TOOL = os.path.join(REPO, 'tests', 'support', 'boot_image.py')


def _collections_path():
    """A collections path on which ``vmimage.qemu`` is this checkout."""
    link = os.path.join(COLLECTIONS, 'ansible_collections', 'vmimage', 'qemu')
    if not os.path.islink(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(REPO, link)
    return COLLECTIONS


def _ansible_env():
    return dict(os.environ, ANSIBLE_COLLECTIONS_PATH=_collections_path(), ANSIBLE_RETRY_FILES_ENABLED='0',
                ANSIBLE_LOCALHOST_WARNING='0', ANSIBLE_INVENTORY_UNPARSED_WARNING='0',
                ANSIBLE_DISPLAY_SKIPPED_HOSTS='0', ANSIBLE_STDOUT_CALLBACK='default')


def _playbook(playbook, extra_vars, become=False):
    cmd = [os.path.join(os.path.dirname(sys.executable), 'ansible-playbook'), '-i', 'localhost,',
           os.path.join(REPO, 'demo', playbook)]
    if become:
        cmd.append('--become')
    for key, value in sorted(extra_vars.items()):
        cmd += ['-e', '%s=%s' % (key, value)]
    return subprocess.call(cmd, env=_ansible_env())


def _processes_using(folder):
    """PIDs of processes (other than us) whose command line or open files
    point into ``folder``: a QEMU left behind by an interrupted boot."""
    found = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open('/proc/%s/cmdline' % entry, 'rb') as f:
                cmdline = f.read().decode('utf-8', 'replace')
            if folder in cmdline:
                found.append(int(entry))
                continue
            fd_dir = '/proc/%s/fd' % entry
            for fd in os.listdir(fd_dir):
                if os.readlink(os.path.join(fd_dir, fd)).startswith(folder + os.sep):
                    found.append(int(entry))
                    break
        except OSError:
            continue
    return found


def _stop_leftovers(folder):
    for pid in _processes_using(folder):
        try:
            os.kill(pid, signal.SIGKILL)
            print('demo: stopped leftover process %d' % pid)
        except OSError:
            pass


def main():
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix='vmimage-demo-')
    become = os.geteuid() != 0
    try:
        image_dir = os.path.join(work, 'image')
        rc = _playbook('build_boot_image.yml', {'boot_image_workdir': image_dir})
        if rc != 0:
            return rc
        with LocalHTTPServer(root=image_dir) as server:
            url = server.url_for('/image.tar.zst')
            print('demo: serving %s and %s' % (url, server.url_for('/SHA256SUMS')))
            rc = _playbook('site.yml', {
                'demo_python': sys.executable,
                'demo_store': os.path.join(work, 'store'),
                'demo_url': url,
                'demo_sums_url': server.url_for('/SHA256SUMS'),
                'demo_boot_tool': BOOT_TOOL,
                'demo_serial_log': os.path.join(work, 'ci-1.serial.log'),
            }, become=become)
            downloads = [r for r in server.requests if r.method == 'GET' and r.path == '/image.tar.zst']
            print('demo: the server saw %d download(s) of the image' % len(downloads))
        if rc == 0:
            print('demo OK in %.1f s; the temporary store %s is removed now' % (time.monotonic() - started, work))
        return rc
    finally:
        _stop_leftovers(work)
        shutil.rmtree(work, ignore_errors=True)
        if become and os.path.exists(work):  # the store was made as root
            subprocess.call(['sudo', 'rm', '-rf', '--', work])


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
