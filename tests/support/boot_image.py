# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A tiny bootable disk for proving that instances really boot.

The boot sector is hand-assembled 16-bit real-mode code (no assembler is
needed on the test host).  When the BIOS runs it, it:

1. reads LBA 2 of the boot disk (int 13h), increments the first byte (a boot
   counter) and writes the sector back (int 13h) -- so every boot writes to
   the disk, which for an instance must land in its own overlay;
2. writes ``<marker> boots=<n>\\r\\n`` to COM1 (I/O port 0x3f8);
3. writes ``exit_code`` to QEMU's ``isa-debug-exit`` device (port 0xf4), so
   QEMU exits at once with status ``(exit_code << 1) | 1``.

    sector = build_boot_sector()                       # 512 bytes, 0x55AA at 510
    folder = make_boot_image_folder(path)              # disk.img + layer.qcow2 + machine.json
    argv += debug_exit_args() + ['-serial', 'file:' + log]
    rc = run_qemu(argv, timeout=60)                    # == expected_exit_status()
    assert parse_boot_lines(open(log).read()) == [1]

Everything here is independent of the library under test except for what the
caller passes in (the library's qemu_args).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import re
import signal
import struct
import subprocess

MARKER = 'VMIMAGE-BOOT-OK'
DEFAULT_EXIT_CODE = 0x31
DEBUG_EXIT_PORT = 0xf4
COUNTER_LBA = 2
SECTOR = 512
LOAD_ADDRESS = 0x7c00
BUFFER = 0x7e00  # sector buffer just past the boot sector

# A machine.json that needs nothing beyond a stock QEMU: small memory, PS/2
# input, no USB devices that would slow the BIOS down.
BOOT_MACHINE = {
    'version': 1,
    'memory': 32,
    'network': 'e1000',
    'storage': 'virtio-blk-pci',
    'graphics': 'VGA',
    'usb': 'piix3-usb-uhci',
    'keyboard': 'PS/2',
    'mouse': 'PS/2',
    'tablet': 'none',
    'sound': 'none',
    # The image's own MAC: instances must never use it.
    'mac': '02:00:5e:00:00:01',
}


class _Asm(object):
    """Just enough of an assembler: fixed-size instructions, labels, and
    8-bit / 16-bit relative and 16-bit absolute label references."""

    def __init__(self, origin):
        self.origin = origin
        self.items = []

    def emit(self, *chunks):
        for chunk in chunks:
            self.items.append(('bytes', bytes(chunk)))
        return self

    def label(self, name):
        self.items.append(('label', name))
        return self

    def rel8(self, opcode, name):
        self.items.append(('rel8', bytes(opcode), name))
        return self

    def rel16(self, opcode, name):
        self.items.append(('rel16', bytes(opcode), name))
        return self

    def abs16(self, prefix, name, suffix=b''):
        self.items.append(('abs16', bytes(prefix), name, bytes(suffix)))
        return self

    @staticmethod
    def _size(item):
        kind = item[0]
        if kind == 'bytes':
            return len(item[1])
        if kind == 'label':
            return 0
        if kind == 'rel8':
            return len(item[1]) + 1
        if kind == 'rel16':
            return len(item[1]) + 2
        return len(item[1]) + 2 + len(item[3])

    def assemble(self):
        labels, pos = {}, 0
        for item in self.items:
            if item[0] == 'label':
                labels[item[1]] = pos
            pos += self._size(item)
        out = bytearray()
        for item in self.items:
            kind = item[0]
            if kind == 'bytes':
                out += item[1]
            elif kind == 'rel8':
                end = len(out) + self._size(item)
                delta = labels[item[2]] - end
                if not -128 <= delta <= 127:
                    raise ValueError('short jump to %s out of range' % item[2])
                out += item[1] + struct.pack('<b', delta)
            elif kind == 'rel16':
                end = len(out) + self._size(item)
                out += item[1] + struct.pack('<h', labels[item[2]] - end)
            elif kind == 'abs16':
                out += item[1] + struct.pack('<H', self.origin + labels[item[2]]) + item[3]
        return bytes(out)


def _disk_transfer(asm, ah, lba_sector, buffer_address):
    """int 13h AH=ah (2 read, 3 write), one sector at CHS 0/0/lba_sector,
    drive number from [drive]."""
    asm.emit(b'\xb8' + struct.pack('<H', (ah << 8) | 1))       # mov ax, ah:01
    asm.emit(b'\xb9' + struct.pack('<H', lba_sector))          # mov cx, 0:sector (cyl 0)
    asm.emit(b'\xb6\x00')                                      # mov dh, 0 (head 0)
    asm.abs16(b'\x8a\x16', 'drive')                            # mov dl, [drive]
    asm.emit(b'\xbb' + struct.pack('<H', buffer_address))      # mov bx, buffer
    asm.emit(b'\xcd\x13')                                      # int 13h


def build_boot_sector(marker=MARKER, exit_code=DEFAULT_EXIT_CODE, debug_exit_port=DEBUG_EXIT_PORT,
                      counter_lba=COUNTER_LBA):
    """The 512-byte boot sector described in the module docstring."""
    if not 0 <= exit_code <= 0x7f:
        raise ValueError('exit_code must fit 7 bits (QEMU exits with (code << 1) | 1)')
    text = marker.encode('ascii')
    if b'\0' in text or len(text) > 200:
        raise ValueError('marker must be short ASCII without NUL')
    sector_number = counter_lba + 1  # CHS sectors count from 1
    asm = _Asm(LOAD_ADDRESS)
    asm.emit(b'\xfa',                      # cli
             b'\x31\xc0',                  # xor ax, ax
             b'\x8e\xd8',                  # mov ds, ax
             b'\x8e\xc0',                  # mov es, ax
             b'\x8e\xd0',                  # mov ss, ax
             b'\xbc\x00\x7c',              # mov sp, 0x7c00
             b'\xfb',                      # sti
             b'\xfc')                      # cld
    asm.abs16(b'\x88\x16', 'drive')        # mov [drive], dl  (the BIOS boot drive)
    _disk_transfer(asm, 2, sector_number, BUFFER)               # read the counter sector
    asm.emit(b'\xa0' + struct.pack('<H', BUFFER),               # mov al, [buffer]
             b'\xfe\xc0',                                       # inc al
             b'\xa2' + struct.pack('<H', BUFFER))               # mov [buffer], al
    _disk_transfer(asm, 3, sector_number, BUFFER)               # write it back
    asm.emit(b'\xa0' + struct.pack('<H', BUFFER),               # mov al, [buffer]
             b'\x04\x30')                                       # add al, '0'
    asm.abs16(b'\xa2', 'digit')                                 # mov [digit], al
    asm.abs16(b'\xbe', 'message')                               # mov si, message
    asm.emit(b'\xba\xf8\x03')                                   # mov dx, 0x3f8 (COM1)
    asm.label('print')
    asm.emit(b'\xac',                                           # lodsb
             b'\x84\xc0')                                       # test al, al
    asm.rel8(b'\x74', 'done')                                   # jz done
    asm.emit(b'\xee')                                           # out dx, al
    asm.rel8(b'\xeb', 'print')                                  # jmp print
    asm.label('done')
    asm.emit(b'\xba' + struct.pack('<H', debug_exit_port),      # mov dx, port
             b'\xb0' + struct.pack('<B', exit_code),            # mov al, code
             b'\xee')                                           # out dx, al -> QEMU exits
    asm.label('hang')
    asm.emit(b'\xf4')                                           # hlt
    asm.rel8(b'\xeb', 'hang')                                   # jmp hang
    asm.label('drive')
    asm.emit(b'\x80')
    asm.label('message')
    asm.emit(text + b' boots=')
    asm.label('digit')
    asm.emit(b'?\r\n\0')
    code = asm.assemble()
    if len(code) > 510:
        raise ValueError('boot sector code is %d bytes, more than 510' % len(code))
    return code.ljust(510, b'\0') + b'\x55\xaa'


def expected_exit_status(exit_code=DEFAULT_EXIT_CODE):
    """The exit status of QEMU after the guest writes exit_code to isa-debug-exit."""
    return (exit_code << 1) | 1


def debug_exit_args(port=DEBUG_EXIT_PORT):
    """QEMU arguments adding the exit device the boot sector writes to."""
    return ['-device', 'isa-debug-exit,iobase=0x%x,iosize=0x04' % port, '-no-reboot']


def make_boot_disk(path, size=16 * 1024 * 1024, **kw):
    """A sparse raw disk of ``size`` bytes with the boot sector at offset 0."""
    sector = build_boot_sector(**kw)
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, sector, 0)
    finally:
        os.close(fd)
    return str(path)


def make_boot_image_folder(folder, disk_size=16 * 1024 * 1024, machine=None, **kw):
    """An image folder (disk.img, layer.qcow2 made by qemu-img, machine.json)
    whose disk boots the sector above."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    make_boot_disk(os.path.join(folder, 'disk.img'), disk_size, **kw)
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', 'disk.img',
                    '-o', 'lazy_refcounts=on', 'layer.qcow2'],
                   cwd=folder, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with open(os.path.join(folder, 'machine.json'), 'w') as f:
        json.dump(BOOT_MACHINE if machine is None else machine, f, sort_keys=True)
    return folder


def parse_boot_lines(text, marker=MARKER):
    """The boot counts printed by the guest, in order.  The guest prints
    one character, '0' + count (so 10 is ':'), which this undoes."""
    pattern = re.compile(r'%s boots=([\x30-\x7e])\r?\n' % re.escape(marker))
    return [ord(m.group(1)) - 0x30 for m in pattern.finditer(text)]


def run_qemu(argv, timeout=60):
    """Run a QEMU command line (argv list) to its end; kill it (and its
    process group) after ``timeout`` s.  Returns (returncode, stderr text)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError('QEMU did not exit within %s s: %s' % (timeout, err.decode('utf-8', 'replace')))
    return proc.returncode, (out + err).decode('utf-8', 'replace')


def install_boot_sector(disk_path, **kw):
    """Write the boot sector at offset 0 of an existing raw disk, leaving its
    size and its holes alone (what ``dd conv=notrunc`` would do)."""
    fd = os.open(str(disk_path), os.O_WRONLY)
    try:
        sector = build_boot_sector(**kw)
        if os.pwrite(fd, sector, 0) != len(sector):
            raise OSError('short write of the boot sector to %s' % disk_path)
        os.fsync(fd)
    finally:
        os.close(fd)


def _main(argv):
    """Command line used by the demo and the molecule scenarios:

    ``boot_image.py install DISK``   put the boot sector on a mutable image's disk.img
    ``boot_image.py qemu-args``      print (JSON) the QEMU arguments the guest needs to exit
    ``boot_image.py parse LOG``      print (JSON) the boot counts found in a serial log
    """
    if len(argv) == 2 and argv[0] == 'install':
        install_boot_sector(argv[1])
        print(json.dumps({'installed': argv[1], 'marker': MARKER}))
        return 0
    if argv == ['qemu-args']:
        print(json.dumps({'args': debug_exit_args(), 'expected_exit_status': expected_exit_status(),
                          'marker': MARKER}))
        return 0
    if len(argv) == 2 and argv[0] == 'parse':
        with open(argv[1], 'r', errors='replace') as f:
            print(json.dumps({'boots': parse_boot_lines(f.read())}))
        return 0
    print(_main.__doc__)
    return 2


if __name__ == '__main__':
    import sys
    sys.exit(_main(sys.argv[1:]))
