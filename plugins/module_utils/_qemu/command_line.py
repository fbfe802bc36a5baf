# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""The QEMU command line of an instance, built from its machine definition.

The result is an argv list (never a shell string) for qemu-system-x86_64:

* the accelerator of accelerator.decide_accelerator(): ``auto`` is KVM only
  when QEMU was seen to start with it and this very CPU model, TCG otherwise
  (``cpu: host`` becomes ``-cpu max`` under TCG, which cannot pass the host
  CPU through);
* ``-nodefaults -no-user-config``: every device comes from machine.json, none
  from QEMU's defaults or the host's /etc/qemu;
* the disk as ``-drive`` with an explicit format and ``file.driver=file``, so
  neither the format nor a protocol is ever probed from the file or its name;
* one NIC of the machine's model carrying the instance MAC.

Values QEMU parses as ``key=value,...`` lists have commas doubled, so a
path or name can never inject an option.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.accelerator import AccelDecision, decide_accelerator
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.host_probe import KVM_DEVICE, QEMU_SYSTEM
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.machine import (
    apply_defaults, is_valid_mac,
)

DISK_FORMATS = ('qcow2', 'raw')

_DRIVE_ID = 'disk0'
_NETDEV_ID = 'net0'
_USB_ID = 'usb0'
_SOUND_ID = 'sound0'
_AUDIODEV_ID = 'audio0'

_IFNAME = re.compile(r'[A-Za-z0-9_.-]{1,15}')
_DISPLAY = re.compile(r'[a-z][a-z0-9-]{0,31}')

# machine.json enum -> QEMU device model.  Both schemas use QEMU's own
# device names, except the PS/2 and 'none' values, which add no device (the
# i440FX board has the i8042 PS/2 controller built in).
_GRAPHICS = {'VGA': 'VGA', 'vmware-svga': 'vmware-svga', 'qxl-vga': 'qxl-vga', 'virtio-vga': 'virtio-vga'}
_USB = {'piix3-usb-uhci': 'piix3-usb-uhci', 'piix4-usb-uhci': 'piix4-usb-uhci', 'nec-usb-xhci': 'nec-usb-xhci'}
_NICS = {'e1000': 'e1000', 'rtl8139': 'rtl8139'}
_STORAGE = {'virtio-blk-pci': 'virtio-blk-pci'}
_KEYBOARDS = {'usb-kbd': 'usb-kbd', 'PS/2': None}
_MICE = {'usb-mouse': 'usb-mouse', 'PS/2': None}
_TABLETS = {'usb-tablet': 'usb-tablet', 'none': None}
_SOUND_CARDS = {'AC97': 'AC97', 'ES1370': 'ES1370'}


def qemu_opt(value):
    """``value`` quoted for a QEMU ``key=value,...`` option list."""
    value = os.fsdecode(os.fspath(value))
    if '\x00' in value or '\n' in value:
        raise ValueError('invalid QEMU option value %r' % (value,))
    return value.replace(',', ',,')


def machine_accelerator(machine, accel='auto', binary=QEMU_SYSTEM, kvm_device=KVM_DEVICE):
    """The AccelDecision for ``machine`` (a version-1 definition): the trial
    uses its chipset and CPU model, the ones its command line carries."""
    machine = apply_defaults(machine)
    return decide_accelerator(accel, cpu=machine['cpu'], machine_type=machine['chipset'], binary=binary,
                              kvm_device=kvm_device)


def _netdev_args(netdev):
    """-netdev arguments for the backend spec, or [] for 'none'."""
    if netdev in (None, 'none'):
        return []
    if netdev == 'user':
        return ['-netdev', 'user,id=%s' % _NETDEV_ID]
    kind, _sep, arg = str(netdev).partition(':')
    if kind == 'tap' and _IFNAME.fullmatch(arg):
        # script=no: QEMU must not run /etc/qemu-ifup as root on our behalf.
        return ['-netdev', 'tap,id=%s,ifname=%s,script=no,downscript=no' % (_NETDEV_ID, arg)]
    if kind == 'bridge' and _IFNAME.fullmatch(arg):
        return ['-netdev', 'bridge,id=%s,br=%s' % (_NETDEV_ID, arg)]
    raise ValueError("netdev must be 'user', 'none', 'tap:<ifname>' or 'bridge:<bridge>', got %r" % (netdev,))


def _sound_args(sound):
    if sound == 'none':
        return []
    # An explicit silent audio backend: without one QEMU picks a host audio
    # driver (and complains on a headless host).
    args = ['-audiodev', 'none,id=%s' % _AUDIODEV_ID]
    if sound in _SOUND_CARDS:
        return args + ['-device', '%s,audiodev=%s' % (_SOUND_CARDS[sound], _AUDIODEV_ID)]
    codec, controller = sound.split('/', 1)
    return args + ['-device', '%s,id=%s' % (controller, _SOUND_ID),
                   '-device', '%s,bus=%s.0,audiodev=%s' % (codec, _SOUND_ID, _AUDIODEV_ID)]


def build_qemu_args(machine, disk, disk_format='qcow2', mac=None, name=None, accel='auto',
                    netdev='user', display='none', binary=QEMU_SYSTEM, kvm_device=KVM_DEVICE):
    """The argv that boots ``disk`` as the VM ``machine`` describes.

    ``machine`` is a version-1 machine definition (validated here, defaults
    filled in); ``mac`` overrides its ``mac``, and one of them must be set
    (an instance never boots with a NIC address left to chance).  ``disk``
    must be an absolute path.  ``accel``: 'auto', 'kvm', 'tcg' or an
    AccelDecision already made (machine_accelerator()).
    ``netdev``: 'user' (default), 'none' (no NIC at all), 'tap:<ifname>' or
    'bridge:<bridge>'.  ``display``: a QEMU -display backend ('none').
    Raises InvalidMachineError for a bad machine, ValueError for bad
    arguments.
    """
    machine = apply_defaults(machine)
    if mac is None:
        mac = machine.get('mac')
    if not is_valid_mac(mac):
        raise ValueError('a lowercase, locally administered, unicast MAC is required, got %r' % (mac,))
    disk = os.fsdecode(os.fspath(disk))
    if not os.path.isabs(disk):
        # A relative name could start with '-' or look like 'nbd:...'.
        raise ValueError('disk must be an absolute path, got %r' % (disk,))
    if disk_format not in DISK_FORMATS:
        raise ValueError('disk_format must be one of %s, got %r' % (', '.join(DISK_FORMATS), disk_format))
    if not _DISPLAY.fullmatch(display or ''):
        raise ValueError('invalid display backend %r' % (display,))
    if not isinstance(accel, AccelDecision):
        accel = machine_accelerator(machine, accel, binary, kvm_device)

    threads, cores, sockets = machine['threads'], machine['cores'], machine['sockets']

    argv = [binary, '-nodefaults', '-no-user-config']
    if name is not None:
        argv += ['-name', qemu_opt(name)]
    argv += [
        '-machine', machine['chipset'],
        '-accel', accel.accel,
        '-cpu', accel.cpu,
        '-smp', '%d,sockets=%d,cores=%d,threads=%d' % (threads * cores * sockets, sockets, cores, threads),
        '-m', '%d' % machine['memory'],
    ]
    if 'uuid' in machine:
        argv += ['-uuid', machine['uuid']]
    argv += ['-display', display, '-k', machine['keyboardLayout']]
    argv += ['-device', _GRAPHICS[machine['graphics']]]
    argv += [
        '-drive', 'if=none,id=%s,format=%s,file.driver=file,file.filename=%s,discard=unmap'
                  % (_DRIVE_ID, disk_format, qemu_opt(disk)),
        '-device', '%s,drive=%s,bootindex=0' % (_STORAGE[machine['storage']], _DRIVE_ID),
    ]
    backend = _netdev_args(netdev)
    if backend:
        argv += backend
        argv += ['-device', '%s,netdev=%s,mac=%s' % (_NICS[machine['network']], _NETDEV_ID, mac)]
    usb_devices = [dev for dev in (_KEYBOARDS[machine['keyboard']], _MICE[machine['mouse']],
                                   _TABLETS[machine['tablet']]) if dev]
    argv += ['-device', '%s,id=%s' % (_USB[machine['usb']], _USB_ID)]
    for dev in usb_devices:
        argv += ['-device', '%s,bus=%s.0' % (dev, _USB_ID)]
    argv += _sound_args(machine['sound'])
    return argv
