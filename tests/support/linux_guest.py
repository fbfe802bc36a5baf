# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A real bootable Debian 12 guest, built from Debian's packages without
mounting anything, for the tests where only a real Linux boot proves the
point (a boot sector runs where a real bootloader dies: REFERENCE §9).

The disk (raw, MBR, syslinux): partition 1 FAT with the kernel, the initrd
and syslinux; partition 2 ext4 holding a minbase userland made by
mmdebstrap with the host's own apt sources.  At boot a systemd unit waits for
the NIC, prints

    VMIMAGE-GUEST-OK uuid=<SMBIOS uuid> mac=<the NIC's address>

on the first serial port and powers the VM off, so QEMU exits by itself.
The uuid and MAC are read inside the guest, from /sys: they prove that the
instance's identity reached the guest.

Building takes a minute or two, so the packed ``image.tar.zst`` is cached
under ``cache_dir()`` keyed by this file's contents: a change to the recipe
builds anew.

    archive = cached_guest_archive()      # path of image.tar.zst (built once)
    argv += guest_qemu_args(log)
    lines = parse_guest_lines(open(log, errors='replace').read())
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile

MARKER = 'VMIMAGE-GUEST-OK'
SUITE = 'bookworm'
HOST_SOURCES = ('/etc/apt/sources.list.d/debian.sources', '/etc/apt/sources.list')
TOOLS = ('mmdebstrap', 'mkfs.vfat', 'mcopy', 'syslinux', 'mkfs.ext4', 'sfdisk')
MBR = '/usr/lib/syslinux/mbr/mbr.bin'
SECTOR = 512
BOOT_START = 2048  # sectors: 1 MiB alignment
BOOT_SECTORS = 96 * 2048  # 96 MiB: kernel + initrd with room to spare
DISK_SIZE = 2 * 1024 ** 3
BUILD_TIMEOUT = 900

# What the test image's machine.json asks for: enough memory for systemd,
# the devices a stock Debian kernel drives, nothing that slows the BIOS.
GUEST_MACHINE = {
    'version': 1,
    'memory': 512,
    'network': 'e1000',
    'storage': 'virtio-blk-pci',
    'graphics': 'VGA',
    'usb': 'piix3-usb-uhci',
    'keyboard': 'PS/2',
    'mouse': 'PS/2',
    'tablet': 'none',
    'sound': 'none',
    'mac': '02:00:5e:00:00:02',
}

_MARKER_SCRIPT = r'''#!/bin/sh
# Wait for the NIC (udev loads its driver), then say who this machine is.
mac=
for _ in $(seq 1 120); do
    for dev in /sys/class/net/*; do
        [ "$(basename "$dev")" = lo ] && continue
        [ -r "$dev/address" ] && mac=$(cat "$dev/address") && break
    done
    [ -n "$mac" ] && break
    sleep 0.5
done
uuid=$(cat /sys/class/dmi/id/product_uuid 2>/dev/null)
printf '\n%s uuid=%s mac=%s\n' MARKER "${uuid:-none}" "${mac:-none}" > /dev/ttyS0
systemctl --no-block poweroff
'''.replace('MARKER', MARKER)

_MARKER_UNIT = '''[Unit]
Description=Print the machine's identity on the serial port, then power off
After=systemd-udevd.service systemd-udev-trigger.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmimage-guest-marker

[Install]
WantedBy=multi-user.target
'''

_SYSLINUX_CFG = '''SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  APPEND initrd=initrd.img root=/dev/vda2 rw console=ttyS0 systemd.show_status=false
'''

_LINE = re.compile(r'%s uuid=(\S+) mac=(\S+)' % re.escape(MARKER))


def missing_tools():
    """The build tools this host lacks (empty when it can build)."""
    return [tool for tool in TOOLS if shutil.which(tool) is None] + ([MBR] if not os.path.exists(MBR) else [])


def host_sources():
    for path in HOST_SOURCES:
        if os.path.exists(path) and os.path.getsize(path):
            return path
    return None


def cache_dir():
    return os.environ.get('VMIMAGE_TEST_CACHE', '/var/cache/vmimage-qemu-tests')


def recipe_digest():
    with open(os.path.abspath(__file__), 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def parse_guest_lines(text):
    """[(uuid, mac)] for every marker line the guest printed."""
    return [(m.group(1), m.group(2)) for m in _LINE.finditer(text)]


def guest_qemu_args(log):
    """What a boot needs beyond the instance's qemu_args: the serial port
    (QEMU's -nodefaults removes it) into ``log``, and exit on reboot."""
    return ['-serial', 'file:' + log, '-no-reboot']


def _run(argv, **kw):
    kw.setdefault('timeout', BUILD_TIMEOUT)
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          check=False, **kw)
    if proc.returncode != 0:
        raise RuntimeError('%s failed (%d): %s' % (argv[0], proc.returncode,
                                                   proc.stdout.decode('utf-8', 'replace')[-3000:]))
    return proc


def _userland(tree):
    """The minbase tree with a kernel, systemd, udev and the marker unit."""
    sources = host_sources()
    if sources is None:
        raise RuntimeError('no apt sources on this host (%s)' % ', '.join(HOST_SOURCES))
    _run(['mmdebstrap', '--variant=minbase', '--include=linux-image-amd64,systemd-sysv,udev',
          '--aptopt=Acquire::Check-Valid-Until "false"', '--skip=cleanup/apt/lists',
          SUITE, tree, sources])
    script = os.path.join(tree, 'usr/local/sbin/vmimage-guest-marker')
    with open(script, 'w') as f:
        f.write(_MARKER_SCRIPT)
    os.chmod(script, 0o755)
    with open(os.path.join(tree, 'etc/systemd/system/vmimage-guest-marker.service'), 'w') as f:
        f.write(_MARKER_UNIT)
    wants = os.path.join(tree, 'etc/systemd/system/multi-user.target.wants')
    os.makedirs(wants, exist_ok=True)
    os.symlink('/etc/systemd/system/vmimage-guest-marker.service',
               os.path.join(wants, 'vmimage-guest-marker.service'))
    with open(os.path.join(tree, 'etc/fstab'), 'w') as f:
        f.write('/dev/vda2 / ext4 rw,errors=remount-ro 0 1\n')
    with open(os.path.join(tree, 'etc/hostname'), 'w') as f:
        f.write('vmimage-guest\n')


def _only(tree, pattern):
    boot = os.path.join(tree, 'boot')
    found = sorted(name for name in os.listdir(boot) if re.match(pattern, name))
    if len(found) != 1:
        raise RuntimeError('expected one %s in %s, found %r' % (pattern, boot, found))
    return os.path.join(boot, found[0])


def _boot_partition(tree, work):
    fat = os.path.join(work, 'boot.fat')
    cfg = os.path.join(work, 'syslinux.cfg')
    with open(cfg, 'w') as f:
        f.write(_SYSLINUX_CFG)
    _run(['mkfs.vfat', '-C', '-n', 'BOOT', '-h', str(BOOT_START), fat, str(BOOT_SECTORS * SECTOR // 1024)])
    _run(['mcopy', '-i', fat, _only(tree, r'vmlinuz-'), '::/vmlinuz'])
    _run(['mcopy', '-i', fat, _only(tree, r'initrd\.img-'), '::/initrd.img'])
    _run(['mcopy', '-i', fat, cfg, '::/syslinux.cfg'])
    _run(['syslinux', '--install', fat])
    return fat


def _copy_into(src, disk, offset):
    _run(['dd', 'if=' + src, 'of=' + disk, 'bs=1M', 'oflag=seek_bytes', 'seek=%d' % offset,
          'conv=notrunc,sparse', 'status=none'])


def build_guest_folder(folder, work):
    """An image folder (disk.img, layer.qcow2, machine.json) with the guest."""
    tree = os.path.join(work, 'tree')
    _userland(tree)
    fat = _boot_partition(tree, work)
    root_start = BOOT_START + BOOT_SECTORS
    root_sectors = DISK_SIZE // SECTOR - root_start
    root = os.path.join(work, 'root.ext4')
    _run(['mkfs.ext4', '-q', '-F', '-L', 'root', '-d', tree, root, '%dk' % (root_sectors * SECTOR // 1024)])
    os.makedirs(folder, exist_ok=True)
    disk = os.path.join(folder, 'disk.img')
    with open(disk, 'wb') as f:
        f.truncate(DISK_SIZE)
    _run(['dd', 'if=' + MBR, 'of=' + disk, 'bs=440', 'count=1', 'conv=notrunc', 'status=none'])
    layout = 'label: dos\nstart=%d, size=%d, type=c, bootable\nstart=%d, size=%d, type=83\n' % (
        BOOT_START, BOOT_SECTORS, root_start, root_sectors)
    proc = subprocess.run(['sfdisk', '--no-reread', '--no-tell-kernel', '-q', disk], input=layout.encode(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError('sfdisk failed: %s' % proc.stdout.decode('utf-8', 'replace'))
    _copy_into(fat, disk, BOOT_START * SECTOR)
    _copy_into(root, disk, root_start * SECTOR)
    _run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', 'disk.img', '-o', 'lazy_refcounts=on',
          'layer.qcow2'], cwd=folder)
    with open(os.path.join(folder, 'machine.json'), 'w') as f:
        json.dump(GUEST_MACHINE, f, sort_keys=True)
    return folder


def cached_guest_archive(pack):
    """Path of the guest's image.tar.zst, built (and packed by ``pack(folder,
    out_path)``) on first use and kept under cache_dir().  A lock makes
    concurrent test runs build it once."""
    root = cache_dir()
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, 'linux-guest-%s-%s.tar.zst' % (SUITE, recipe_digest()))
    with open(os.path.join(root, '.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            return path
        # Holding the lock, anything else here is an older recipe's image or
        # a killed build's debris.
        for name in os.listdir(root):
            if name.startswith('linux-guest-'):
                victim = os.path.join(root, name)
                if os.path.isdir(victim):
                    shutil.rmtree(victim, ignore_errors=True)
                else:
                    os.unlink(victim)
        work = tempfile.mkdtemp(prefix='linux-guest-', dir=root)
        try:
            folder = build_guest_folder(os.path.join(work, 'image'), work)
            partial = path + '.partial'
            pack(folder, partial)
            os.rename(partial, path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return path
