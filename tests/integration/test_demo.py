# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The README's first command, minus the machine set-up: demo/run_demo.py
builds, serves, caches, instantiates and boots, and leaves nothing behind."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import glob
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _qemu_processes():
    found = set()
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open('/proc/%s/cmdline' % entry, 'rb') as f:
                    if b'vmimage-demo-' in f.read():
                        found.add(int(entry))
            except OSError:
                pass
    return found


def test_demo_boots_an_instance_and_cleans_up():
    demos_before = set(glob.glob(os.path.join(tempfile.gettempdir(), 'vmimage-demo-*')))
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'demo', 'run_demo.py')], cwd=REPO,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=300, check=False)
    out = proc.stdout.decode('utf-8', 'replace')
    assert proc.returncode == 0, out[-4000:]
    assert 'ci-1 serial console: VMIMAGE-BOOT-OK boots=1' in out, out[-4000:]
    assert 'instances: ci-1, ci-2' in out
    assert 'cached: demo-boot fetched' in out
    assert 'the server saw 1 download(s) of the image' in out
    assert 'demo OK in' in out
    # Nothing left running, nothing left on disk.
    assert not _qemu_processes()
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), 'vmimage-demo-*'))) == demos_before
