# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Test helpers: image folders, GNU tar/zstd pipelines, sparse comparison,
and a raw tar builder for crafting malformed or malicious archives.

Nothing here imports the library: these helpers are the independent side of
every interoperability test (the real GNU tar, the real zstd CLI, the real
qemu-img, and SEEK_DATA/SEEK_HOLE read directly).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import io
import json
import os
import subprocess

import zstandard

BLOCK = 512
MEMBERS = ('disk.img', 'layer.qcow2', 'machine.json')
SPARSE_VERSIONS = (None, '0.0', '0.1', '1.0')


# ---------------------------------------------------------------- image folders

def make_sparse_file(path, size, chunks=()):
    """Create ``path`` as a sparse file of ``size`` bytes holding ``chunks``,
    an iterable of (offset, bytes) written with pwrite; the rest are holes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset, data in chunks:
            if offset + len(data) > size:
                raise ValueError('chunk %d+%d beyond size %d' % (offset, len(data), size))
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
    finally:
        os.close(fd)
    return path


def pattern(length, seed=0):
    """Deterministic, non-zero, poorly compressible-enough bytes."""
    out = bytearray(length)
    x = (seed * 2654435761 + 12345) & 0xffffffff
    for i in range(length):
        x = (x * 1103515245 + 12345) & 0xffffffff
        out[i] = ((x >> 16) & 0xff) | 1
    return bytes(out)


def qemu_img_layer(folder, name='layer.qcow2', backing='disk.img'):
    """A real qcow2 v3 overlay of ``backing`` (raw), made by qemu-img."""
    subprocess.run(
        ['qemu-img', 'create', '-q', '-f', 'qcow2',
         '-o', 'backing_file=%s,backing_fmt=raw,lazy_refcounts=on' % backing, name],
        cwd=folder, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return os.path.join(folder, name)


def make_image_folder(folder, disk_size=1024 * 1024, chunks=None, machine=None):
    """Build ``folder`` with disk.img (sparse), layer.qcow2 (qemu-img) and machine.json.

    ``chunks``: (offset, bytes) pairs for disk.img; by default a little data
    at the start, the middle and the end.  ``machine``: a dict (dumped as JSON)
    or bytes; default ``{"version": 1}``.
    """
    folder = str(folder)
    if not os.path.isdir(folder):
        os.makedirs(folder)
    if chunks is None:
        chunks = []
        if disk_size:
            chunks.append((0, pattern(min(4096, disk_size), 1)))
        if disk_size > 3 * 65536:
            chunks.append((disk_size // 2 + 123, pattern(5000, 2)))
            chunks.append((disk_size - 777, pattern(777, 3)))
    make_sparse_file(os.path.join(folder, 'disk.img'), disk_size, chunks)
    qemu_img_layer(folder)
    if machine is None:
        machine = {'version': 1}
    if isinstance(machine, dict):
        machine = json.dumps(machine, sort_keys=True).encode('ascii')
    with open(os.path.join(folder, 'machine.json'), 'wb') as f:
        f.write(machine)
    return folder


# ---------------------------------------------------------------- GNU tar + zstd CLI

def _run_pipeline(first, second, stdin=None, stdout=None, cwd=None):
    """Run ``first | second`` with argument lists (no shell); raise on failure."""
    p1 = subprocess.Popen(first, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    p2 = subprocess.Popen(second, stdin=p1.stdout, stdout=stdout if stdout is not None else subprocess.PIPE,
                          stderr=subprocess.PIPE, cwd=cwd)
    p1.stdout.close()  # p2 owns the pipe now; p1 gets SIGPIPE if p2 dies
    out2, err2 = p2.communicate()
    err1 = p1.stderr.read()
    p1.stderr.close()
    rc1 = p1.wait()
    if rc1 != 0 or p2.returncode != 0:
        raise RuntimeError('pipeline failed: %r -> %d (%s) | %r -> %d (%s)' % (
            first, rc1, err1.decode('utf-8', 'replace'), second, p2.returncode,
            err2.decode('utf-8', 'replace')))
    return out2


def gnu_tar_command(folder, sparse_version=None, members=MEMBERS, sparse=True, extra=()):
    cmd = ['tar']
    if sparse:
        cmd.append('-S')
    if sparse_version is not None:
        cmd += ['--format=posix', '--sparse-version=%s' % sparse_version]
    cmd += list(extra)
    cmd += ['-C', str(folder), '-cf', '-', '--']
    cmd += list(members)
    return cmd


def gnu_tar_bytes(folder, sparse_version=None, members=MEMBERS, sparse=True, extra=()):
    """The uncompressed tar stream GNU tar writes for ``members`` of ``folder``."""
    return subprocess.run(gnu_tar_command(folder, sparse_version, members, sparse, extra),
                          check=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE).stdout


def gnu_tar_archive(folder, out, sparse_version=None, members=MEMBERS, sparse=True, level=3, extra=()):
    """``tar -S [--format=posix --sparse-version=V] -C folder -cf - names | zstd -q -T0 -LEVEL > out``.

    ``sparse_version`` None means GNU tar's default (gnu format, old GNU
    sparse headers).  ``sparse=False`` drops ``-S`` (holes stored as zeros).
    """
    out = str(out)
    with open(out, 'wb') as f:
        _run_pipeline(gnu_tar_command(folder, sparse_version, members, sparse, extra),
                      ['zstd', '-q', '-T0', '-%d' % level, '-c'], stdout=f)
    return out


def extract_with_gnu_tar(archive, dest):
    """``zstd -dc archive | tar -S -xf - -C dest``."""
    dest = str(dest)
    if not os.path.isdir(dest):
        os.makedirs(dest)
    _run_pipeline(['zstd', '-q', '-dc', '--', str(archive)], ['tar', '-S', '-xf', '-', '-C', dest])
    return dest


def zstd_cli_compress(data, level=3, long_window=None, extra=()):
    """Compress ``data`` with the zstd CLI from stdin (so the window is not
    shrunk to a known source size).  ``long_window``: ``--long=N``."""
    cmd = ['zstd', '-q', '-c', '-%d' % level]
    if long_window:
        cmd.append('--long=%d' % long_window)
    cmd += list(extra)
    return subprocess.run(cmd, input=data, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout


def zstd_compress(data, level=3, window_log=None, checksum=True):
    """Compress ``data`` as one streamed frame (no content size in the header,
    so the decoder must honour the declared window)."""
    if window_log is not None:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=window_log, write_checksum=int(checksum), write_content_size=0)
        cctx = zstandard.ZstdCompressor(compression_params=params)
    else:
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=checksum, write_content_size=False)
    out = io.BytesIO()
    with cctx.stream_writer(out, closefd=False) as w:
        w.write(data)
    return out.getvalue()


def zstd_frames(data, cuts, level=3):
    """Split ``data`` at ``cuts`` (offsets) and compress each part as its own frame."""
    bounds = [0] + sorted(cuts) + [len(data)]
    return b''.join(zstd_compress(data[a:b], level) for a, b in zip(bounds, bounds[1:]))


def zstd_decompress(data):
    dctx = zstandard.ZstdDecompressor()
    return dctx.stream_reader(io.BytesIO(data), read_across_frames=True).read()


# ---------------------------------------------------------------- sparse files

def data_extents_of(path):
    """Data extents of ``path`` as (offset, length), found with SEEK_DATA/SEEK_HOLE."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        return _extents_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _extents_fd(fd, size):
    extents = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if extents and extents[-1][0] + extents[-1][1] == start:
            extents[-1] = (extents[-1][0], end - extents[-1][0])
        else:
            extents.append((start, end - start))
        pos = end
    return extents


def merge_extents(*lists):
    """Union of extent lists, sorted and coalesced."""
    spans = sorted((o, o + n) for extents in lists for o, n in extents if n)
    merged = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b - a) for a, b in merged]


def allocated_bytes(path):
    return os.stat(str(path)).st_blocks * 512


def data_bytes_of(path):
    return sum(n for _offset, n in data_extents_of(path))


def same_sparse_content(a, b, chunk=1024 * 1024):
    """True when files ``a`` and ``b`` have the same size and the same bytes.

    Only the union of both files' data extents is read: outside it both are
    holes, hence zeros, so holes are never read byte by byte.
    """
    fa = os.open(str(a), os.O_RDONLY)
    fb = os.open(str(b), os.O_RDONLY)
    try:
        size = os.fstat(fa).st_size
        if os.fstat(fb).st_size != size:
            return False
        for offset, length in merge_extents(_extents_fd(fa, size), _extents_fd(fb, size)):
            pos, end = offset, offset + length
            while pos < end:
                n = min(chunk, end - pos)
                if os.pread(fa, n, pos) != os.pread(fb, n, pos):
                    return False
                pos += n
        return True
    finally:
        os.close(fa)
        os.close(fb)


def describe_difference(a, b):
    """A short human description for assertion messages."""
    sa, sb = os.path.getsize(str(a)), os.path.getsize(str(b))
    if sa != sb:
        return 'sizes differ: %d != %d' % (sa, sb)
    return 'same size %d, extents %r vs %r' % (sa, data_extents_of(a)[:8], data_extents_of(b)[:8])


def assert_still_sparse(path, expected_data, slack_per_extent=8192, extents=1):
    """Allocated size is close to the data, not the apparent size."""
    allocated = allocated_bytes(path)
    bound = expected_data + slack_per_extent * max(1, extents) + 65536
    assert allocated <= bound, '%s: %d bytes allocated for %d bytes of data (apparent %d)' % (
        path, allocated, expected_data, os.path.getsize(str(path)))


# ---------------------------------------------------------------- raw tar crafting

def octal_field(value, width):
    """NUL-terminated zero-padded octal, as tar writes it."""
    text = ('%0*o' % (width - 1, value)).encode('ascii')
    if len(text) > width - 1:
        raise ValueError('%d does not fit %d octal digits' % (value, width - 1))
    return text + b'\0'


def base256_field(value, width, negative=False):
    """GNU base-256: 0x80 marker then big-endian magnitude (0xff marker and
    two's complement when ``negative``)."""
    if negative:
        raw = ((1 << (8 * width)) - value).to_bytes(width, 'big')
        return b'\xff' + raw[1:]
    return b'\x80' + value.to_bytes(width - 1, 'big')


def number_field(value, width):
    """Octal when it fits, base-256 otherwise (GNU tar's choice)."""
    if value < 8 ** (width - 1):
        return octal_field(value, width)
    return base256_field(value, width)


def _field(value, width):
    if isinstance(value, bytes):
        return value.ljust(width, b'\0')[:width]
    return number_field(value, width)


def _b(value):
    if isinstance(value, str):
        return value.encode('utf-8')
    return value


def pax_record(key, value):
    """One pax record ``"<len> key=value\\n"``; key/value str or bytes."""
    body = b' ' + _b(key) + b'=' + _b(str(value) if isinstance(value, int) else value) + b'\n'
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode('ascii') + body


def pad(data):
    return data + b'\0' * (-len(data) % BLOCK)


def build_header(name, size=0, typeflag=b'0', linkname=b'', mode=0o644, mtime=0, uid=0, gid=0,
                 magic=b'ustar\x0000', prefix=b'', size_field=None, checksum=None, gnu_sparse=None,
                 patch=None):
    """One 512-byte header with every field under the caller's control.

    ``size_field``: raw 12 bytes replacing the size (non-octal, base-256...).
    ``checksum``: an int to store instead of the right one (bad checksum).
    ``gnu_sparse``: dict(entries=[(off, len)...] up to 4, realsize=int,
    extended=bool) for old GNU 'S' headers (the magic becomes GNU's).
    Numbers given as bytes are stored raw.  ``patch``: {offset: bytes}.
    """
    h = bytearray(BLOCK)
    name = _b(name)
    h[0:100] = name.ljust(100, b'\0')[:100]
    h[100:108] = _field(mode, 8)
    h[108:116] = _field(uid, 8)
    h[116:124] = _field(gid, 8)
    h[124:136] = size_field.ljust(12, b'\0')[:12] if size_field is not None else number_field(size, 12)
    h[136:148] = _field(mtime, 12)
    h[156:157] = _b(typeflag)
    h[157:257] = _b(linkname).ljust(100, b'\0')[:100]
    if gnu_sparse is not None:
        magic = b'ustar  \0'
    h[257:265] = magic
    if magic[:6] == b'ustar\0':
        h[345:500] = _b(prefix).ljust(155, b'\0')[:155]
    if gnu_sparse is not None:
        entries = list(gnu_sparse.get('entries', ()))
        if len(entries) > 4:
            raise ValueError('an old GNU header holds at most 4 sparse entries')
        for i, (off, length) in enumerate(entries):
            h[386 + 24 * i:398 + 24 * i] = _field(off, 12)
            h[398 + 24 * i:410 + 24 * i] = _field(length, 12)
        h[482] = 1 if gnu_sparse.get('extended') else 0
        h[483:495] = _field(gnu_sparse.get('realsize', 0), 12)
    for off, data in (patch or {}).items():
        h[off:off + len(data)] = data
    h[148:156] = b' ' * 8
    value = sum(h) if checksum is None else checksum
    h[148:156] = ('%06o' % value).encode('ascii') + b'\0 '
    return bytes(h)


def old_gnu_extension_block(entries, extended):
    """A GNU sparse extension block: up to 21 entries, then the 'more follows' byte."""
    if len(entries) > 21:
        raise ValueError('an extension block holds at most 21 entries')
    b = bytearray(BLOCK)
    for i, (off, length) in enumerate(entries):
        b[24 * i:24 * i + 12] = _field(off, 12)
        b[24 * i + 12:24 * i + 24] = _field(length, 12)
    b[504] = 1 if extended else 0
    return bytes(b)


def sparse_data(entries, content):
    """The bytes stored for ``entries`` of a file whose full content is
    ``content`` (a callable offset,length -> bytes, or bytes)."""
    if callable(content):
        return b''.join(content(o, n) for o, n in entries)
    return b''.join(content[o:o + n].ljust(n, b'\0') for o, n in entries)


def sparse_10_map(entries, count=None):
    """The GNU sparse 1.0 map text (count, then offset/length lines), padded."""
    lines = [str(len(entries) if count is None else count)]
    for off, length in entries:
        lines += [str(off), str(length)]
    return pad(('\n'.join(lines) + '\n').encode('ascii'))


class RawTarBuilder(object):
    """Append arbitrary tar pieces, then ``tar_bytes()`` or ``zst()``.

    Every method returns ``self`` so cases read as one chain.
    """

    def __init__(self):
        self.parts = []

    # raw pieces
    def raw(self, data):
        self.parts.append(_b(data))
        return self

    def header(self, name, size=0, **kw):
        self.parts.append(build_header(name, size, **kw))
        return self

    def data(self, data, padded=True):
        self.parts.append(pad(data) if padded else data)
        return self

    # members
    def file(self, name, data=b'', typeflag=b'0', **kw):
        """A header and its padded data; ``size`` in kw overrides the declared size."""
        size = kw.pop('size', len(data))
        self.header(name, size, typeflag=typeflag, **kw)
        return self.data(data)

    def link(self, name, target, typeflag=b'2', **kw):
        return self.header(name, 0, typeflag=typeflag, linkname=target, **kw)

    def pax(self, records, name='./PaxHeaders/x', typeflag=b'x', **kw):
        """A pax header; ``records``: list of (key, value) or one raw bytes body."""
        body = records if isinstance(records, bytes) else b''.join(pax_record(k, v) for k, v in records)
        self.header(name, len(body), typeflag=typeflag, **kw)
        return self.data(body)

    def gnu_long_name(self, long_name, typeflag=b'L'):
        body = _b(long_name) + b'\0'
        self.header('././@LongLink', len(body), typeflag=typeflag, magic=b'ustar  \0')
        return self.data(body)

    def old_gnu_sparse(self, name, realsize, entries, content=b'', ext_blocks=None, size=None,
                       header_entries=None, data=None, **kw):
        """An old GNU 'S' member.  By default the first 4 entries go in the
        header and the rest in extension blocks of 21; ``ext_blocks`` gives
        the extension blocks verbatim instead.  ``size``: declared stored size
        (default: sum of lengths); ``data``: stored bytes verbatim."""
        entries = list(entries)
        head = entries[:4] if header_entries is None else list(header_entries)
        rest = entries[4:] if header_entries is None else []
        if ext_blocks is None:
            groups = [rest[i:i + 21] for i in range(0, len(rest), 21)]
            ext_blocks = [old_gnu_extension_block(g, i < len(groups) - 1) for i, g in enumerate(groups)]
        stored = sparse_data(entries, content) if data is None else data
        if size is None:
            size = len(stored)
        self.header(name, size, typeflag=b'S',
                    gnu_sparse=dict(entries=head, realsize=realsize, extended=bool(ext_blocks)), **kw)
        for block in ext_blocks:
            self.raw(block)
        return self.data(stored)

    def pax_sparse(self, version, name, realsize, entries, content=b'', extra_records=(), numblocks=None,
                   size=None, data=None, map_text=None, header_name=None, records=None, **kw):
        """A GNU sparse member in pax form, ``version`` '0.0', '0.1' or '1.0'.

        ``numblocks``: the declared GNU.sparse.numblocks (default: the real
        count; False leaves it out).  ``map_text``: the 1.0 map block(s)
        verbatim.  ``records``: the whole pax record list verbatim.
        """
        entries = list(entries)
        stored = sparse_data(entries, content) if data is None else data
        if numblocks is None:
            numblocks = len(entries)
        if version == '1.0':
            body = sparse_10_map(entries) if map_text is None else map_text
            stored = body + stored
            default = [('GNU.sparse.major', '1'), ('GNU.sparse.minor', '0'),
                       ('GNU.sparse.name', name), ('GNU.sparse.realsize', realsize)]
            hname = header_name or './GNUSparseFile.0/' + _b(name).decode('utf-8', 'replace')
        elif version == '0.1':
            default = [('GNU.sparse.size', realsize)]
            if numblocks is not False:
                default.append(('GNU.sparse.numblocks', numblocks))
            default += [('GNU.sparse.name', name),
                        ('GNU.sparse.map', ','.join('%d,%d' % e for e in entries))]
            hname = header_name or './GNUSparseFile.0/' + _b(name).decode('utf-8', 'replace')
        elif version == '0.0':
            default = [('GNU.sparse.size', realsize)]
            if numblocks is not False:
                default.append(('GNU.sparse.numblocks', numblocks))
            for off, length in entries:
                default += [('GNU.sparse.offset', off), ('GNU.sparse.numbytes', length)]
            hname = header_name or name
        else:
            raise ValueError('unknown sparse version %r' % version)
        recs = list(records) if records is not None else default + list(extra_records)
        self.pax(recs)
        if size is None:
            size = len(stored)
        self.header(hname, size, **kw)
        return self.data(stored)

    def end(self, blocks=2, record=None):
        """End-of-archive zero blocks, optionally padded to a ``record`` size."""
        self.parts.append(b'\0' * (BLOCK * blocks))
        if record:
            total = sum(len(p) for p in self.parts)
            self.parts.append(b'\0' * (-total % record))
        return self

    def tar_bytes(self):
        return b''.join(self.parts)

    def zst(self, level=3, window_log=None, frames=None):
        """zstd-compressed stream: one frame, or split at ``frames`` offsets."""
        data = self.tar_bytes()
        if frames:
            return zstd_frames(data, frames, level)
        return zstd_compress(data, level, window_log)


def valid_builder(disk=b'disk-data', layer=b'QFI\xfb-not-really', machine=b'{"version": 1}'):
    """A builder holding a minimal well-formed image (no end marker yet)."""
    return (RawTarBuilder().file('disk.img', disk).file('layer.qcow2', layer)
            .file('machine.json', machine))


# ---------------------------------------------------------------- tree inspection

def tree_entries(root):
    """Every path under ``root`` (relative), with its lstat mode, symlinks not followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(str(root), followlinks=False):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            found.append((os.path.relpath(p, str(root)), os.lstat(p).st_mode))
    return sorted(found)
