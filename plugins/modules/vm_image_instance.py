#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: vm_image_instance
short_description: Create and remove copy-on-write QEMU VM instances of cached images
version_added: 0.1.0
description:
  - Makes O(name) a VM instance of the cached image O(image) in the host's image store, or removes it.
  - An instance is a qcow2 overlay C(<store>/instances/<name>/disk.qcow2) whose backing chain ends in the cached image
    (instance C(qcow2) -> image C(layer.qcow2) C(qcow2) -> image C(disk.img) C(raw)), with the backing format explicit
    at every step. Creating one costs the same for a 1 GiB and a 50 GiB image; the cached files stay read-only and are
    shared by any number of instances.
  - Each instance gets its own MAC address (random, locally administered, unicast, never the image's default and never
    another instance's) and its own uuid, kept for its lifetime, and a machine definition made of the image's
    C(machine.json) with O(machine) merged over it, validated against the C(machine.json) schema.
  - An instance holds a reference on its image, so the image can be neither removed (M(vmimage.qemu.vm_image_fetch)
    with C(state=absent) fails and names the instances) nor garbage-collected while the instance exists.
    The reference is taken atomically with the instance's creation, so a failed or killed run leaks none.
  - A running VM is detected by the image locks QEMU holds on the disk it opened (a process that has the disk open
    for writing counts too); removing or replacing such an instance is refused unless O(force) is set.
    The processes holding the disk are returned as RV(owners).
  - Returns the QEMU command line for the instance (RV(qemu_args)), ready to run without a shell.
author:
  - vmimage.qemu developers (@vmimage)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - vmimage.qemu.store
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
options:
  name:
    description:
      - Name of the instance, unique in the store.
      - Must match C([A-Za-z0-9][A-Za-z0-9_.-]{0,63}).
    type: str
    required: true
  image:
    description:
      - The cached image to create the instance from, by name (the O(vmimage.qemu.vm_image_fetch#module:image_id)
        it was fetched under) or by C(sha256:<hex>) digest.
      - Required when O(state=present).
    type: str
  state:
    description:
      - V(present) creates the instance when it is missing, and updates its MAC and machine definition when they
        differ from the request (the disk is kept).
      - V(absent) removes the instance and its disk, releasing its reference on the image.
    type: str
    choices: [present, absent]
    default: present
  mac:
    description:
      - MAC address of the instance's network card, six lowercase hex octets separated by colons
        (for example V(52:54:00:12:34:56)), locally administered and unicast (the second hex digit of the
        first octet is V(2), V(6), V(a) or V(e)), not the image's default and not used by another instance.
      - When omitted, an existing instance keeps its MAC and a new one gets a random address.
    type: str
  machine:
    description:
      - "Overrides merged over the image's C(machine.json) (version 1 schema) for this instance, for example
        C({memory: 4096, cores: 2}). A value of V(null) removes the field, so the default applies."
      - C(uuid) and C(mac) here set the instance's identity (C(mac) must then agree with O(mac)).
      - When omitted, an existing instance keeps its overrides and a new one gets none.
    type: dict
  recreate:
    description:
      - When the instance exists but was created from another image (O(image) now names a different digest),
        replace it by a fresh instance of O(image), keeping its MAC and uuid. The old disk and its changes are lost.
      - Without it, such a mismatch is an error and nothing changes.
    type: bool
    default: false
  force:
    description:
      - Remove or replace the instance even while a process (a running VM) holds its disk.
        The VM keeps running on the deleted disk until it stops.
    type: bool
    default: false
  accel:
    description:
      - The accelerator in RV(qemu_args).
      - V(auto) uses KVM only when it is proven to work on this host for the module's user. The device opens
        read-write and answers the KVM API, and C(qemu-system-x86_64) itself, started paused and without devices
        with the instance's machine type and C(-accel kvm -cpu host), stays up and reports KVM enabled.
        Otherwise it falls back to TCG with C(-cpu max), and RV(accel_reason) says why.
        The verdict is cached per boot in C(/run/vmimage-qemu) (root) or C($XDG_RUNTIME_DIR) and renewed when QEMU,
        the kernel, the device or the user's groups change.
      - V(kvm) and V(tcg) are used as given, without a trial.
    type: str
    choices: [auto, kvm, tcg]
    default: auto
requirements:
  - Python 3.9 or newer on the target
  - qemu-img (package qemu-utils)
  - Linux C(/proc) (for RV(owners))
notes:
  - Running the VM is up to you; RV(qemu_args) is an argv list for C(qemu-system-x86_64) with the accelerator of
    O(accel), user-mode networking and no display.
  - Processes of other users are only visible to root; a lock held by an invisible process is still detected and
    reported, with C(pid) and C(command) null.
seealso:
  - module: vmimage.qemu.vm_image_fetch
  - module: vmimage.qemu.vm_image_info
'''

EXAMPLES = r'''
- name: Cache the image
  vmimage.qemu.vm_image_fetch:
    url: https://images.example.com/builder/2026-11/image.tar.zst
    checksum: sha256:0f343b0931126a20f133d67c2b018a3b7b9f8f7e2c6a1d6b0d6e1c4e8f9a7b2c
    image_id: builder

- name: Two build VMs from it
  vmimage.qemu.vm_image_instance:
    name: "build-{{ item }}"
    image: builder
    machine:
      memory: 4096
      cores: 2
  loop: [1, 2]
  register: vms

- name: Start them
  ansible.builtin.command:
    argv: "{{ item.qemu_args + ['-daemonize', '-vnc', 'unix:/run/vm-' + item.name + '.vnc'] }}"
  loop: "{{ vms.results }}"

- name: Rebuild a VM from the new version of the image, keeping its MAC
  vmimage.qemu.vm_image_instance:
    name: build-1
    image: builder
    recreate: true

- name: Drop a VM (fails while it runs, unless force)
  vmimage.qemu.vm_image_instance:
    name: build-2
    state: absent
'''

RETURN = r'''
name:
  description: Name of the instance.
  returned: always
  type: str
  sample: build-1
action:
  description: What the module did (or would do in check mode) - V(none), V(create), V(update), V(replace) or V(remove).
  returned: always
  type: str
  sample: create
disk:
  description: Absolute path of the instance's disk (the qcow2 overlay).
  returned: when state=present
  type: str
  sample: /var/lib/vm-images/instances/build-1/disk.qcow2
format:
  description: Format of RV(disk), always C(qcow2).
  returned: when state=present
  type: str
  sample: qcow2
image_id:
  description: The image reference the instance was created with.
  returned: when the instance exists or would be created
  type: str
  sample: builder
digest:
  description: C(sha256:<hex>) of the image the instance uses.
  returned: when the instance exists or would be created
  type: str
mac:
  description: MAC address of the instance. Null in check mode when a new instance would draw a random one.
  returned: when state=present
  type: str
  sample: "52:54:9a:1e:03:7c"
uuid:
  description: uuid of the instance (the VM's SMBIOS uuid). Null in check mode when a new instance would draw one.
  returned: when state=present
  type: str
machine:
  description: The instance's validated machine definition (image C(machine.json) + overrides, defaults filled in,
    with the instance's C(mac) and C(uuid)).
  returned: when state=present
  type: dict
  sample: {"version": 1, "memory": 4096, "cores": 2, "network": "e1000", "mac": "52:54:9a:1e:03:7c"}
qemu_args:
  description: The argv (no shell) that boots the instance with C(qemu-system-x86_64); add your display, serial
    and monitor options.
  returned: when state=present and the instance's MAC is known
  type: list
  elements: str
accel:
  description: The accelerator in RV(qemu_args), V(kvm) or V(tcg).
  returned: when RV(qemu_args) is
  type: str
  sample: kvm
accel_reason:
  description:
    - Why RV(accel) was chosen - V(requested) for an explicit O(accel), otherwise the outcome of the KVM trial,
      with QEMU's own error text when KVM was refused and the VM falls back to TCG.
  returned: when RV(qemu_args) is
  type: str
  sample: "qemu-system-x86_64 -machine pc-i440fx-2.8 -accel kvm -cpu host was killed by signal 6 before answering
    (qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69)"
backing_chain:
  description: The disk's backing chain from the instance to the raw image disk, each with its format, as
    C(qemu-img info --backing-chain) reports it (in check mode, as it would be).
  returned: when state=present
  type: list
  elements: dict
  sample: [{"filename": "/var/lib/vm-images/instances/build-1/disk.qcow2", "format": "qcow2"},
           {"filename": "/var/lib/vm-images/images/0f34.../layer.qcow2", "format": "qcow2"},
           {"filename": "/var/lib/vm-images/images/0f34.../disk.img", "format": "raw"}]
owners:
  description:
    - Processes holding the instance's disk - those holding QEMU's image lock on it (a running VM) or having it
      open for writing - each with C(pid), C(command) (the program's name only; a QEMU command line can carry
      secrets), C(fd), C(writable) and C(locks) (the kernel's lines for its locks on the disk).
    - A lock held by a process this user cannot inspect is reported as one entry whose C(pid) and C(command) are null.
    - For O(state=absent), the owners at the time of removal (non-empty only with O(force)).
  returned: always
  type: list
  elements: dict
  sample: [{"pid": 4242, "command": "qemu-system-x86_64", "fd": 14, "writable": true,
            "locks": ["1: OFDLCK ADVISORY  READ -1 fe:00:2204005 100 101"]}]
error_kind:
  description:
    - On failure, the class of the failure, for playbooks to branch on without parsing C(msg); the collection's
      guide (C(docs/guide.md), section Troubleshooting) describes every kind with example messages.
    - Typical values for this module are V(not_found), V(in_use), V(invalid_machine), V(store), V(qemu_img),
      V(no_space) and V(permission). V(internal) is a bug.
  returned: on failure
  type: str
  sample: in_use
holders:
  description:
    - When removing or replacing the instance was refused because processes hold its disk (RV(error_kind=in_use)),
      those processes, in the form of RV(owners), as M(vmimage.qemu.vm_image_package) returns them.
  returned: on failure because the instance's disk is in use
  type: list
  elements: dict
  sample: [{"pid": 4242, "command": "qemu-system-x86_64", "fd": 14, "writable": true,
            "locks": ["1: OFDLCK ADVISORY  READ -1 fe:00:2204005 100 101"]}]
'''

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.accelerator import ACCELERATORS
from ansible_collections.vmimage.qemu.plugins.module_utils._instance.instance import (
    INSTANCE_FORMAT, InstanceManager, check_instance_name,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._modules.common import (
    STORE_ARGUMENT_SPEC, argument_spec, error_result,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore

_DIFF_KEYS = ('name', 'image_id', 'digest', 'mac', 'uuid', 'machine')


def _diff_side(record):
    if not record:
        return {}
    return dict((k, record.get(k)) for k in _DIFF_KEYS)


def _present_result(manager, change, check_mode, accel):
    record = change.after
    name = record['name']
    result = dict(
        name=name, action=change.action, disk=manager.disk_path(name), format=INSTANCE_FORMAT,
        image_id=record.get('image_id'), digest=record.get('digest'), mac=record.get('mac'),
        uuid=record.get('uuid'), machine=record.get('machine'), owners=change.owners,
    )
    if record.get('mac'):
        decision = manager.accelerator(record, accel)
        result.update(qemu_args=manager.qemu_args(record, accel=decision), accel=decision.accel,
                      accel_reason=decision.reason)
    if check_mode and change.action in ('create', 'replace'):
        result['backing_chain'] = manager.expected_chain(name, record['digest'])
    else:
        result['backing_chain'] = manager.backing_chain(name)
    return result


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(
            STORE_ARGUMENT_SPEC,
            name=dict(type='str', required=True),
            image=dict(type='str'),
            state=dict(type='str', choices=['present', 'absent'], default='present'),
            mac=dict(type='str'),
            machine=dict(type='dict'),
            recreate=dict(type='bool', default=False),
            force=dict(type='bool', default=False),
            accel=dict(type='str', choices=list(ACCELERATORS), default='auto'),
        ),
        required_if=[('state', 'present', ('image',))],
        supports_check_mode=True,
    )
    p = module.params
    started = time.monotonic()
    name = p['name']
    try:
        check_instance_name(name)
        store = ImageStore(p['store'], create=False)
        if p['state'] == 'absent':
            if not store.exists:
                module.exit_json(changed=False, name=name, action='none', owners=[])
            manager = InstanceManager(store)
            change = manager.remove(name, force=p['force'], check_mode=module.check_mode)
            result = dict(changed=change.changed, name=name, action=change.action, owners=change.owners)
            if change.before:
                result.update(image_id=change.before.get('image_id'), digest=change.before.get('digest'))
        else:
            if store.exists and not module.check_mode:
                store.ensure()  # an older store may lack instances/
            manager = InstanceManager(store)
            change = manager.ensure_present(name, p['image'], mac=p['mac'], machine=p['machine'],
                                            recreate=p['recreate'], force=p['force'],
                                            check_mode=module.check_mode)
            result = _present_result(manager, change, module.check_mode, p['accel'])
            result['changed'] = change.changed
        if module._diff:
            result['diff'] = dict(before=_diff_side(change.before), after=_diff_side(change.after))
        result['elapsed'] = round(time.monotonic() - started, 3)
        module.exit_json(**result)
    except Exception as exc:  # every failure gets an error_kind (error_result)
        module.fail_json(name=name, elapsed=round(time.monotonic() - started, 3), **error_result(exc))


if __name__ == '__main__':
    main()
