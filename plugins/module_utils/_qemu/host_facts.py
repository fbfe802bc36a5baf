# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""What a hypervisor host offers, as one report (the vm_host_info result).

The KVM verdict is the accelerator decision instances get (accelerator.py),
so the facts a role sets from this report always agree with the command
lines vm_image_instance hands out.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.accelerator import decide_accelerator
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.host_probe import (
    KVM_DEVICE, python_libraries, qemu_versions,
)


def kvm_report(kvm_device=KVM_DEVICE, binary=None, cache_dir='default'):
    """The ``kvm`` part of the report: the device probe, then QEMU's trial."""
    decision = decide_accelerator('auto', binary=binary, kvm_device=kvm_device, cache_dir=cache_dir)
    device = decision.kvm  # 'auto' always probes the device first
    usable = decision.accel == 'kvm'
    return dict(
        usable=usable,
        reason='ok' if usable else decision.reason,
        device=device['device'],
        api_version=device['api_version'],
        device_usable=device['usable'],
        qemu_error=decision.qemu_error,
        cached=decision.cached,
    ), decision


def probe_host(kvm_device=KVM_DEVICE, path=None, cache_dir='default'):
    """Everything the host offers as one dict."""
    qemu = qemu_versions(path)
    kvm, decision = kvm_report(kvm_device, binary=qemu['system_binary'], cache_dir=cache_dir)
    return dict(
        kvm=kvm,
        accelerator=decision.accel,
        cpu=decision.cpu,
        qemu=qemu,
        python=python_libraries(),
    )
