#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: vm_host_info
short_description: Report whether a host can run QEMU with KVM, its QEMU versions and the modules' Python libraries
version_added: 0.1.0
description:
  - Opens the KVM device read-write and asks it C(KVM_GET_API_VERSION), as QEMU does before using it. When that
    fails, RV(kvm.reason) says why in one sentence (device missing, permission denied with the device's owner,
    group and mode and whether the module's user is in that group, no driver, wrong API version, ioctl error).
  - A device that answers is not yet proof, since on some hosts QEMU aborts at start with C(-accel kvm -cpu host).
    So the module then starts C(qemu-system-x86_64) itself, paused and without devices, with the machine type,
    accelerator and CPU model instances get (C(-machine pc-i440fx-2.8 -accel kvm -cpu host)), and counts KVM
    usable only when that process answers QMP with KVM enabled. QEMU's own error text is returned in
    RV(kvm.qemu_error).
  - This is the decision M(vmimage.qemu.vm_image_instance) makes for O(vmimage.qemu.vm_image_instance#module:accel=auto),
    and the verdict is shared with it through a cache in C(/run/vmimage-qemu) (root) or C($XDG_RUNTIME_DIR)
    (other users), keyed by the QEMU binary, the kernel, the boot, the device and the user, so it never outlives
    a QEMU upgrade or a reboot.
  - The answer is for the user the module runs as (with C(become), usually root); another user may be refused
    where root is not.
  - Runs C(qemu-system-x86_64 --version) and C(qemu-img --version) (argument lists, 10 s timeout) and reports the
    versions; a missing or broken binary is reported as V(null).
  - Reports whether the Python libraries the other modules need (C(zstandard), C(requests)) import in the
    interpreter running the module, and their versions.
  - Read-only; never reports a change.
author:
  - vmimage.qemu developers (@vmimage)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  kvm_device:
    description:
      - Path of the KVM device to probe.
    type: path
    default: /dev/kvm
requirements:
  - Python 3.9 or newer on the target
  - Linux
notes:
  - The role C(vmimage.qemu.hypervisor) runs this module and sets the facts C(vmimage_kvm_usable),
    C(vmimage_kvm_reason), C(vmimage_accelerator) and C(vmimage_qemu_version) from its result.
seealso:
  - module: vmimage.qemu.vm_image_instance
'''

EXAMPLES = r'''
- name: Can this host run VMs with KVM?
  vmimage.qemu.vm_host_info:
  register: host

- name: Explain why not
  ansible.builtin.debug:
    msg: "KVM unusable: {{ host.kvm.reason }}; VMs will run under TCG (much slower)"
  when: not host.kvm.usable

- name: The modules need their Python libraries on the target
  ansible.builtin.assert:
    that:
      - host.python.zstandard is not none
      - host.python.requests is not none
    fail_msg: "install python3-zstandard and python3-requests for {{ host.python.executable }}"
'''

RETURN = r'''
kvm:
  description: Whether KVM is usable by the module's user.
  returned: always
  type: dict
  contains:
    usable:
      description: The device opened read-write, answered API version 12, and QEMU started with KVM and the
        instances' CPU model.
      type: bool
      sample: true
    reason:
      description: V(ok) when usable, otherwise why not.
      type: str
      sample: "qemu-system-x86_64 -machine pc-i440fx-2.8 -accel kvm -cpu host was killed by signal 6 before
        answering (qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69)"
    device_usable:
      description: Whether the device alone passed (opened read-write and answered API version 12).
      type: bool
      sample: true
    qemu_error:
      description: What QEMU printed when it failed to start with KVM, V(null) otherwise.
      type: str
      sample: "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69"
    cached:
      description: Whether the QEMU trial's verdict came from the cache (made earlier in this boot).
      type: bool
      sample: false
    device:
      description: The device probed.
      type: str
      sample: /dev/kvm
    api_version:
      description: The answer to C(KVM_GET_API_VERSION), V(null) when the device could not be asked.
      type: int
      sample: 12
accelerator:
  description: The QEMU accelerator VMs get on this host for this user, V(kvm) when KVM is usable, else V(tcg).
  returned: always
  type: str
  sample: kvm
cpu:
  description: The CPU model instances get with that accelerator (V(host) under KVM, V(max) under TCG).
  returned: always
  type: str
  sample: host
qemu:
  description: The QEMU binaries found on C(PATH) (then C(/usr/bin), C(/usr/sbin) and friends) and their versions.
  returned: always
  type: dict
  contains:
    system_binary:
      description: Path of C(qemu-system-x86_64), V(null) when not installed.
      type: str
      sample: /usr/bin/qemu-system-x86_64
    system_version:
      description: Its version, V(null) when missing or when it did not answer C(--version).
      type: str
      sample: 7.2.22
    img_binary:
      description: Path of C(qemu-img), V(null) when not installed.
      type: str
      sample: /usr/bin/qemu-img
    img_version:
      description: Its version, V(null) when missing or when it did not answer C(--version).
      type: str
      sample: 7.2.22
python:
  description: The Python interpreter running the module and the libraries the other modules need.
  returned: always
  type: dict
  contains:
    version:
      description: Version of the interpreter.
      type: str
      sample: 3.11.2
    executable:
      description: Path of the interpreter.
      type: str
      sample: /usr/bin/python3
    zstandard:
      description: Version of C(zstandard), V(null) when it does not import.
      type: str
      sample: 0.20.0
    requests:
      description: Version of C(requests), V(null) when it does not import.
      type: str
      sample: 2.28.1
error_kind:
  description:
    - On failure, the class of the failure. The probe reports what it finds as facts, so the only failure is
      V(internal), a bug.
  returned: on failure
  type: str
  sample: internal
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.host_facts import probe_host
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.host_probe import KVM_DEVICE
from ansible_collections.vmimage.qemu.plugins.module_utils._modules.common import error_result


def main():
    module = AnsibleModule(
        argument_spec=dict(kvm_device=dict(type='path', default=KVM_DEVICE)),
        supports_check_mode=True,
    )
    try:
        facts = probe_host(module.params['kvm_device'])
    except Exception as exc:  # the probe reports problems as facts; anything else is a bug
        module.fail_json(**error_result(exc))
    module.exit_json(changed=False, **facts)


if __name__ == '__main__':
    main()
