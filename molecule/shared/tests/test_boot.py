# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A VM instance of the cached bootable image really boots on the target."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, ansible_args

INSTANCE = 'molecule-boot-check'
IMAGE = 'molecule-boot'
QEMU_TIMEOUT = 180  # seconds; the guest exits within a second or two, even under TCG


def boot_sector_args():
    """The extra QEMU arguments the test guest needs, and the exit status it ends with."""
    out = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'support', 'boot_image.py'), 'qemu-args'],
                         stdout=subprocess.PIPE, check=True)
    return json.loads(out.stdout)


def instance(host, store, **kw):
    return host.ansible('vmimage.qemu.vm_image_instance', ansible_args(store=store, name=INSTANCE, **kw),
                        check=False)


@pytest.fixture(scope='module')
def fresh_instance(host, settings):
    """A new instance (boot counter at zero: only test_instance_boots boots it), removed afterwards."""
    store = settings['image_cache_store']
    instance(host, store, state='absent')
    created = instance(host, store, image=IMAGE)
    assert created['changed'] and created['action'] == 'create'
    yield created
    instance(host, store, state='absent')


def test_instance_boots(host, settings, fresh_instance):
    qemu_args = fresh_instance['qemu_args']
    accel = qemu_args[qemu_args.index('-accel') + 1]
    # KVM when the target can use it, TCG otherwise: the instance must agree
    # with the hypervisor role's fact (cached by converge) and with a fresh probe.
    role_fact = host.ansible('ansible.builtin.debug', ansible_args(msg='{{ vmimage_accelerator }}'))['msg']
    assert accel == role_fact == host.ansible('vmimage.qemu.vm_host_info')['accelerator']

    guest = boot_sector_args()
    log = os.path.join(settings['vmimage_molecule_run'], 'boot-serial.log')
    host.run('rm -f -- %s', log)
    argv = ['timeout', '--kill-after=10', str(QEMU_TIMEOUT)] + qemu_args + guest['args'] + ['-serial', 'file:' + log]
    run = host.run(' '.join(['%s'] * len(argv)), *argv)
    serial = host.file(log).content_string if host.file(log).exists else ''
    assert run.rc == guest['expected_exit_status'], (
        'QEMU (%s) exited %d, serial log %r, stderr %s' % (accel, run.rc, serial, run.stderr))
    boots = re.findall(r'%s boots=(\S+)' % re.escape(guest['marker']), serial)
    assert boots == ['1'], serial


def test_instance_disk_is_an_overlay_of_the_cached_image(fresh_instance, store_info):
    chain = fresh_instance['backing_chain']
    assert [link['format'] for link in chain] == ['qcow2', 'qcow2', 'raw']
    image = [i for i in store_info['images'] if IMAGE in i['aliases']][0]
    assert chain[-1]['filename'] == os.path.join(image['path'], 'disk.img')
