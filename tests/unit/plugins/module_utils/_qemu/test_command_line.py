# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The QEMU command line of an instance: argv only, explicit formats, the
accelerator choice, every machine.json value mapped to a device this QEMU
really has, and the real qemu-system-x86_64 accepting the result."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import shutil
import subprocess

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.accelerator import decide_accelerator
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import InvalidMachineError
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.machine import (
    GRAPHICS_DEVICES, KEYBOARDS, MICE, NETWORK_DEVICES, SOUND_DEVICES, TABLETS, USB_CONTROLLERS,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.command_line import (
    build_qemu_args, machine_accelerator, qemu_opt,
)

QEMU = shutil.which('qemu-system-x86_64')
needs_qemu = pytest.mark.skipif(QEMU is None, reason='qemu-system-x86_64 not installed')
MAC = '52:54:00:12:34:56'
DISK = '/var/lib/vm-images/instances/a/disk.qcow2'
NO_KVM = '/nonexistent/kvm'


def _opt(argv, flag):
    """Every value following ``flag`` in argv."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_default_machine_gives_explicit_drive_nic_and_tcg_without_kvm():
    argv = build_qemu_args({'version': 1}, DISK, mac=MAC, name='a', kvm_device=NO_KVM)
    assert argv[0] == 'qemu-system-x86_64'
    assert all(isinstance(a, str) for a in argv)
    assert _opt(argv, '-accel') == ['tcg']
    assert _opt(argv, '-cpu') == ['max'], "cpu 'host' cannot be passed through by TCG"
    assert _opt(argv, '-machine') == ['pc-i440fx-2.8']
    assert _opt(argv, '-m') == ['1024']
    assert _opt(argv, '-smp') == ['1,sockets=1,cores=1,threads=1']
    drive = _opt(argv, '-drive')
    assert drive == ['if=none,id=disk0,format=qcow2,file.driver=file,file.filename=%s,discard=unmap' % DISK]
    devices = _opt(argv, '-device')
    assert 'virtio-blk-pci,drive=disk0,bootindex=0' in devices
    assert 'e1000,netdev=net0,mac=%s' % MAC in devices
    assert 'qxl-vga' in devices
    assert 'nec-usb-xhci,id=usb0' in devices
    assert {'usb-kbd,bus=usb0.0', 'usb-mouse,bus=usb0.0', 'usb-tablet,bus=usb0.0'} <= set(devices)
    assert _opt(argv, '-netdev') == ['user,id=net0']
    assert '-nodefaults' in argv and '-no-user-config' in argv
    assert _opt(argv, '-name') == ['a']


def test_kvm_keeps_host_cpu_and_machine_values_are_used():
    machine = {'version': 1, 'memory': 4096, 'threads': 2, 'cores': 4, 'sockets': 2, 'network': 'rtl8139',
               'graphics': 'virtio-vga', 'usb': 'piix3-usb-uhci', 'keyboard': 'PS/2', 'mouse': 'PS/2',
               'tablet': 'none', 'keyboardLayout': 'de-ch', 'uuid': '12345678-1234-4234-8234-123456789abc',
               'mac': '02:00:00:00:00:99'}
    argv = build_qemu_args(machine, DISK, accel='kvm')
    assert _opt(argv, '-accel') == ['kvm'] and _opt(argv, '-cpu') == ['host']
    assert _opt(argv, '-smp') == ['16,sockets=2,cores=4,threads=2']
    assert _opt(argv, '-m') == ['4096']
    assert _opt(argv, '-uuid') == ['12345678-1234-4234-8234-123456789abc']
    assert _opt(argv, '-k') == ['de-ch']
    devices = _opt(argv, '-device')
    assert 'rtl8139,netdev=net0,mac=02:00:00:00:00:99' in devices, 'the machine mac is used without an override'
    assert not any(d.startswith(('usb-kbd', 'usb-mouse', 'usb-tablet')) for d in devices)
    assert 'virtio-vga' in devices


def test_sound_devices_get_a_silent_audio_backend():
    ac97 = build_qemu_args({'version': 1, 'sound': 'AC97'}, DISK, mac=MAC, kvm_device=NO_KVM)
    assert _opt(ac97, '-audiodev') == ['none,id=audio0']
    assert 'AC97,audiodev=audio0' in _opt(ac97, '-device')
    hda = build_qemu_args({'version': 1, 'sound': 'hda-micro/ich9-intel-hda'}, DISK, mac=MAC, kvm_device=NO_KVM)
    devices = _opt(hda, '-device')
    assert devices.index('ich9-intel-hda,id=sound0') < devices.index('hda-micro,bus=sound0.0,audiodev=audio0')
    silent = build_qemu_args({'version': 1}, DISK, mac=MAC, kvm_device=NO_KVM)
    assert '-audiodev' not in silent


def test_option_values_cannot_inject_options():
    path = '/srv/vm,file.driver=nbd,x/disk.qcow2'
    argv = build_qemu_args({'version': 1}, path, mac=MAC, name='a,b', kvm_device=NO_KVM)
    assert 'file.filename=/srv/vm,,file.driver=nbd,,x/disk.qcow2,discard=unmap' in _opt(argv, '-drive')[0]
    assert _opt(argv, '-name') == ['a,,b']
    assert qemu_opt('a,b,,c') == 'a,,b,,,,c'
    with pytest.raises(ValueError):
        qemu_opt('x\ny')


@pytest.mark.parametrize('kw, match', [
    (dict(disk='disk.qcow2'), 'absolute'),
    (dict(disk='nbd:evil:1234'), 'absolute'),
    (dict(mac=None), 'MAC'),
    (dict(mac='01:00:00:00:00:01'), 'MAC'),
    (dict(mac='52:54:00:12:34:5G'), 'MAC'),
    (dict(disk_format='vmdk'), 'disk_format'),
    (dict(accel='hvf'), 'accel'),
    (dict(netdev='tap:eth0;rm'), 'netdev'),
    (dict(display='sdl,gl=on'), 'display'),
])
def test_bad_arguments_are_refused(kw, match):
    args = dict(machine={'version': 1}, disk=DISK, mac=MAC, kvm_device=NO_KVM)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        build_qemu_args(**args)


def test_invalid_machine_is_refused():
    with pytest.raises(InvalidMachineError):
        build_qemu_args({'version': 1, 'memory': 0}, DISK, mac=MAC)
    with pytest.raises(InvalidMachineError):
        build_qemu_args({'version': 1, 'bogus': 1}, DISK, mac=MAC)


def test_network_backends():
    def nets(netdev):
        argv = build_qemu_args({'version': 1}, DISK, mac=MAC, netdev=netdev, kvm_device=NO_KVM)
        return _opt(argv, '-netdev'), [d for d in _opt(argv, '-device') if 'netdev=' in d]
    assert nets('tap:tap0') == (['tap,id=net0,ifname=tap0,script=no,downscript=no'],
                                ['e1000,netdev=net0,mac=%s' % MAC])
    assert nets('bridge:br0')[0] == ['bridge,id=net0,br=br0']
    assert nets('none') == ([], [])


def test_accelerator_comes_from_the_decision():
    assert machine_accelerator({'version': 1}, 'auto', kvm_device=NO_KVM).accel == 'tcg'
    assert machine_accelerator({'version': 1}, 'tcg').accel == 'tcg'
    explicit = machine_accelerator({'version': 1}, 'kvm', kvm_device=NO_KVM)
    assert (explicit.accel, explicit.cpu) == ('kvm', 'host'), 'an explicit choice is not second-guessed'
    assert machine_accelerator({'version': 1}, 'auto', kvm_device='/dev/null').accel == 'tcg', \
        'a device that does not answer the KVM ioctl is not KVM'
    decision = decide_accelerator('auto')
    argv = build_qemu_args({'version': 1}, DISK, mac=MAC)
    assert (_opt(argv, '-accel'), _opt(argv, '-cpu')) == ([decision.accel], [decision.cpu])
    given = build_qemu_args({'version': 1}, DISK, mac=MAC, accel=explicit, kvm_device=NO_KVM)
    assert (_opt(given, '-accel'), _opt(given, '-cpu')) == (['kvm'], ['host']), 'a decision made is used as is'


@needs_qemu
def test_every_machine_value_maps_to_a_device_this_qemu_has():
    out = subprocess.run([QEMU, '-device', 'help'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=60, check=True).stdout
    known = set(line.split('"')[1] for line in out.splitlines() if line.startswith('name "'))
    used = set()
    values = [('graphics', GRAPHICS_DEVICES), ('usb', USB_CONTROLLERS), ('network', NETWORK_DEVICES),
              ('sound', SOUND_DEVICES), ('keyboard', KEYBOARDS), ('mouse', MICE), ('tablet', TABLETS)]
    for field, choices in values:
        for value in choices:
            argv = build_qemu_args({'version': 1, field: value}, DISK, mac=MAC, kvm_device=NO_KVM)
            used.update(d.split(',')[0] for d in _opt(argv, '-device'))
    assert used - known == set()


# Together these use every graphics, USB, NIC, sound, keyboard, mouse and tablet value.
_FULL_MACHINES = [
    {'graphics': 'VGA', 'usb': 'piix3-usb-uhci', 'network': 'e1000', 'sound': 'AC97', 'keyboard': 'PS/2',
     'mouse': 'PS/2', 'tablet': 'none'},
    {'graphics': 'vmware-svga', 'usb': 'piix4-usb-uhci', 'network': 'rtl8139', 'sound': 'ES1370',
     'keyboard': 'usb-kbd', 'mouse': 'usb-mouse', 'tablet': 'usb-tablet', 'cores': 2},
    {'graphics': 'qxl-vga', 'usb': 'nec-usb-xhci', 'sound': 'hda-duplex/intel-hda', 'keyboardLayout': 'fr'},
    {'graphics': 'virtio-vga', 'sound': 'hda-output/ich9-intel-hda', 'uuid': '12345678-1234-4234-8234-123456789abc'},
]


@needs_qemu
@pytest.mark.parametrize('overrides', _FULL_MACHINES, ids=lambda m: m['graphics'])
def test_real_qemu_accepts_the_command_line(tmp_path, overrides):
    disk = str(tmp_path / 'disk,with comma.qcow2')
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', disk, '16M'], check=True)
    machine = dict({'version': 1, 'memory': 32}, **overrides)
    argv = build_qemu_args(machine, disk, mac=MAC, name='t', accel='tcg')
    # Paused (-S): QEMU parses every option and realises every device, then
    # quits through the monitor.
    proc = subprocess.run(argv + ['-S', '-monitor', 'stdio'], input='info network\nquit\n',
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert 'macaddr=%s' % MAC in proc.stdout
