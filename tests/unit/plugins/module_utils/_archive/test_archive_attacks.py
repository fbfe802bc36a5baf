# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The malicious-archive corpus (REFERENCE §4 items 6, 7 and 9, tar level).

Every case is a crafted ``image.tar.zst`` given to the reader with a staging
folder inside a parent directory, next to an ``outside`` directory holding a
sentinel file that the attacks aim at.  Each must fail with the right
exception class and a message naming the problem, create nothing outside the
staging folder, leave the sentinel alone, and leave in the staging folder only
regular files among the three allowed names.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import io
import os
import re
import stat
import struct
import time

import pytest
import zstandard

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.reader import extract_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    InvalidArchiveError, LimitExceededError, UnsafeImageError,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import ImageLimits

from support.image_factory import (
    BLOCK, MEMBERS, RawTarBuilder, base256_field, build_header, old_gnu_extension_block, pattern,
    sparse_10_map, valid_builder, zstd_cli_compress, zstd_compress,
)

KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB
SENTINEL = b'sentinel: must not change\n'
LAYOUTS = ('gnu', '0.0', '0.1', '1.0')
DISK_CONTENT = pattern(4096, 42)


def _passwd_digest():
    try:
        with open('/etc/passwd', 'rb') as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


class Ctx(object):
    """Paths of one case: tmp/{outside/sentinel, parent/staging}."""

    def __init__(self, tmp_path):
        self.root = str(tmp_path)
        self.outside = os.path.join(self.root, 'outside')
        self.sentinel = os.path.join(self.outside, 'sentinel')
        self.parent = os.path.join(self.root, 'parent')
        self.staging = os.path.join(self.parent, 'staging')
        # From the staging folder, this relative name reaches the sentinel.
        self.rel_sentinel = '../../outside/sentinel'


def ustar_name(path):
    """Split a long path into (prefix, name) ustar fields."""
    path = path.encode('utf-8') if isinstance(path, str) else path
    if len(path) <= 100:
        return b'', path
    cut = path.rfind(b'/', 0, 156)
    while cut > 0 and len(path) - cut - 1 > 100:
        cut = path.rfind(b'/', 0, cut)
    assert 0 < cut and len(path[:cut]) <= 155, path
    return path[:cut], path[cut + 1:]


def valid(tail=None, **kw):
    """The three good members (then ``tail``, a builder step), ended."""
    b = valid_builder(disk=DISK_CONTENT, **kw)
    if tail is not None:
        tail(b)
    return b.end(record=10240)


def evil_first(step):
    """``step`` (the attack) first, then a whole good image."""
    b = RawTarBuilder()
    step(b)
    b.file('disk.img', DISK_CONTENT).file('layer.qcow2', b'QFI\xfb').file('machine.json', b'{"version": 1}')
    return b.end(record=10240)


def with_members(disk_step, layer=b'QFI\xfb', machine=b'{"version": 1}'):
    """``disk_step`` writes the disk member; good layer and machine follow."""
    b = RawTarBuilder()
    disk_step(b)
    return b.file('layer.qcow2', layer).file('machine.json', machine).end()


def sparse_member(layout, name, realsize, entries, content=DISK_CONTENT, **kw):
    """A builder step adding one sparse member in ``layout``."""
    def step(b):
        if layout == 'gnu':
            b.old_gnu_sparse(name, realsize, entries, content, **kw)
        else:
            b.pax_sparse(layout, name, realsize, entries, content, **kw)
    return step


# ---------------------------------------------------------------- the corpus

CASES = []


def case(case_id, exc, keyword, limits=None, timeout=20):
    """Register ``build(ctx) -> compressed archive bytes`` as a case."""
    def register(build):
        CASES.append(pytest.param(build, exc, keyword, limits, id=case_id,
                                  marks=pytest.mark.timeout(timeout)))
        return build
    return register


def Z(builder, **kw):
    return builder.zst(**kw)


# ---- item 6: names

@case('absolute-name-to-sentinel', UnsafeImageError, r'absolute')
def build_absolute_name_to_sentinel(ctx):
    prefix, name = ustar_name(ctx.sentinel)
    return Z(evil_first(lambda b: b.file(name, b'pwned', prefix=prefix)))


@case('absolute-name-of-allowed-member', UnsafeImageError, r'absolute')
def build_absolute_name_of_allowed_member(ctx):
    return Z(evil_first(lambda b: b.file('/disk.img', b'pwned')))


@case('absolute-name-after-good-members', UnsafeImageError, r'absolute')
def build_absolute_name_after_good_members(ctx):
    prefix, name = ustar_name(ctx.sentinel)
    return Z(valid(lambda b: b.file(name, b'pwned', prefix=prefix)))


@case('dotdot-name', UnsafeImageError, r'\.\.')
def build_dotdot_name(ctx):
    return Z(evil_first(lambda b: b.file('../escaped', b'pwned')))


@case('dotdot-to-sentinel', UnsafeImageError, r'\.\.')
def build_dotdot_to_sentinel(ctx):
    return Z(evil_first(lambda b: b.file(ctx.rel_sentinel, b'pwned')))


@case('dot-slash-dotdot', UnsafeImageError, r'\.\.')
def build_dot_slash_dotdot(ctx):
    return Z(evil_first(lambda b: b.file('./../x', b'pwned')))


@case('dotdot-inside-allowed-name', UnsafeImageError, r'\.\.')
def build_dotdot_inside_allowed_name(ctx):
    return Z(evil_first(lambda b: b.file('disk.img/../../escaped', b'pwned')))


@case('ustar-prefix-dotdot', UnsafeImageError, r'\.\.')
def build_ustar_prefix_dotdot(ctx):
    return Z(evil_first(lambda b: b.file('disk.img', b'pwned', prefix=b'../..')))


@case('name-with-nul', UnsafeImageError, r'suspicious')
def build_name_with_nul(ctx):
    return Z(evil_first(lambda b: b.pax([('path', b'machine.json\0.evil')]).file('machine.json', b'{}')))


@case('name-with-backslash', UnsafeImageError, r'suspicious')
def build_name_with_backslash(ctx):
    return Z(evil_first(lambda b: b.file('..\\..\\outside\\sentinel', b'pwned')))


@case('name-with-newline', InvalidArchiveError, r'unexpected archive member')
def build_name_with_newline(ctx):
    return Z(evil_first(lambda b: b.file('disk.img\n', b'pwned')))


@case('pax-path-absolute', UnsafeImageError, r'absolute')
def build_pax_path_absolute(ctx):
    return Z(evil_first(lambda b: b.pax([('path', ctx.sentinel)]).file('disk.img', b'pwned')))


@case('pax-path-dotdot', UnsafeImageError, r'\.\.')
def build_pax_path_dotdot(ctx):
    return Z(evil_first(lambda b: b.pax([('path', ctx.rel_sentinel)]).file('disk.img', b'pwned')))


@case('pax-linkpath-on-symlink', UnsafeImageError, r'link')
def build_pax_linkpath_on_symlink(ctx):
    return Z(evil_first(lambda b: b.pax([('linkpath', ctx.sentinel)]).link('disk.img', 'x')))


@case('gnu-sparse-name-dotdot-1.0', UnsafeImageError, r'\.\.')
def build_gnu_sparse_name_dotdot_1_0(ctx):
    return Z(evil_first(sparse_member('1.0', '../x', 8192, [(0, 4096)])))


@case('gnu-sparse-name-dotdot-0.1', UnsafeImageError, r'\.\.')
def build_gnu_sparse_name_dotdot_0_1(ctx):
    return Z(evil_first(sparse_member('0.1', ctx.rel_sentinel, 8192, [(0, 4096)])))


@case('gnu-sparse-name-overrides-good-path', UnsafeImageError, r'\.\.')
def build_gnu_sparse_name_overrides_good_path(ctx):
    return Z(evil_first(sparse_member('1.0', 'disk.img', 8192, [(0, 4096)],
                                      records=[('path', 'disk.img'), ('GNU.sparse.major', 1),
                                               ('GNU.sparse.minor', 0), ('GNU.sparse.name', '../x'),
                                               ('GNU.sparse.realsize', 8192)])))


@case('gnu-long-name-L', InvalidArchiveError, r'GNU long name')
def build_gnu_long_name_l(ctx):
    return Z(evil_first(lambda b: b.gnu_long_name('../' * 40 + 'x').file('disk.img', b'pwned')))


@case('gnu-long-link-K', InvalidArchiveError, r'GNU long link')
def build_gnu_long_link_k(ctx):
    return Z(evil_first(lambda b: b.gnu_long_name(ctx.sentinel, typeflag=b'K').link('disk.img', 'x')))


@case('pax-global-header', InvalidArchiveError, r'pax global header')
def build_pax_global_header(ctx):
    return Z(evil_first(lambda b: b.pax([('path', ctx.rel_sentinel)], typeflag=b'g')))


@case('pax-header-dangling-before-end', InvalidArchiveError, r'pax header without a member')
def build_pax_header_dangling_before_end(ctx):
    return Z(valid(tail=lambda b: b.pax([('path', '../../outside/sentinel')])))


@case('two-pax-headers', InvalidArchiveError, r'two pax headers')
def build_two_pax_headers(ctx):
    return Z(evil_first(lambda b: b.pax([('path', 'disk.img')]).pax([('path', '../x')])))


# ---- item 6: member types

@case('symlink-disk-to-etc-passwd', UnsafeImageError, r'symbolic link.*not allowed')
def build_symlink_disk_to_etc_passwd(ctx):
    return Z(evil_first(lambda b: b.link('disk.img', '/etc/passwd')))


@case('symlink-then-write-through', UnsafeImageError, r'symbolic link')
def build_symlink_then_write_through(ctx):
    return Z(evil_first(lambda b: b.link('evil', '../../outside').file('evil/sentinel', b'pwned')))


@case('symlink-after-good-members', UnsafeImageError, r'symbolic link')
def build_symlink_after_good_members(ctx):
    return Z(valid(lambda b: b.link('escape', ctx.sentinel)))


@case('hardlink-disk-to-etc-passwd', UnsafeImageError, r'hard link')
def build_hardlink_disk_to_etc_passwd(ctx):
    return Z(evil_first(lambda b: b.link('disk.img', '/etc/passwd', typeflag=b'1')))


@case('hardlink-to-sentinel', UnsafeImageError, r'hard link')
def build_hardlink_to_sentinel(ctx):
    return Z(evil_first(lambda b: b.link('machine.json', ctx.sentinel, typeflag=b'1')))


@case('char-device', UnsafeImageError, r'character device')
def build_char_device(ctx):
    return Z(evil_first(lambda b: b.header('disk.img', typeflag=b'3', patch={329: b'0000001\0', 337: b'0000003\0'})))


@case('block-device', UnsafeImageError, r'block device')
def build_block_device(ctx):
    return Z(evil_first(lambda b: b.header('disk.img', typeflag=b'4', patch={329: b'0000010\0'})))


@case('fifo', UnsafeImageError, r'FIFO')
def build_fifo(ctx):
    return Z(evil_first(lambda b: b.header('machine.json', typeflag=b'6')))


@case('directory', UnsafeImageError, r'directory')
def build_directory(ctx):
    return Z(evil_first(lambda b: b.header('disk.img/', typeflag=b'5', mode=0o755)))


@case('contiguous-file', InvalidArchiveError, r'unsupported type')
def build_contiguous_file(ctx):
    return Z(evil_first(lambda b: b.file('disk.img', b'x', typeflag=b'7')))


@case('unknown-typeflag', InvalidArchiveError, r'unsupported type')
def build_unknown_typeflag(ctx):
    return Z(evil_first(lambda b: b.file('disk.img', b'x', typeflag=b'Z')))


@case('duplicate-member', UnsafeImageError, r'twice|duplicate')
def build_duplicate_member(ctx):
    return Z(valid(lambda b: b.file('disk.img', b'second copy')))


@case('duplicate-member-dot-slash', UnsafeImageError, r'twice|duplicate')
def build_duplicate_member_dot_slash(ctx):
    return Z(valid(lambda b: b.file('./layer.qcow2', b'second copy')))


@case('extra-member', InvalidArchiveError, r'unexpected archive member')
def build_extra_member(ctx):
    return Z(valid(lambda b: b.file('README', b'hello')))


@case('missing-member', InvalidArchiveError, r'lacks.*machine\.json')
def build_missing_member(ctx):
    return Z(RawTarBuilder().file('disk.img', DISK_CONTENT).file('layer.qcow2', b'QFI\xfb').end())


@case('empty-tar', InvalidArchiveError, r'lacks')
def build_empty_tar(ctx):
    return Z(RawTarBuilder().end())


# ---- tar structure

@case('bad-header-checksum', InvalidArchiveError, r'checksum')
def build_bad_header_checksum(ctx):
    return Z(evil_first(lambda b: b.header('disk.img', 10, checksum=12345).data(b'0123456789')))


@case('non-octal-size', InvalidArchiveError, r'size is not an octal number')
def build_non_octal_size(ctx):
    return Z(evil_first(lambda b: b.header('disk.img', size_field=b'00000001x00\0')))


@case('negative-base256-size', InvalidArchiveError, r'negative size')
def build_negative_base256_size(ctx):
    return Z(evil_first(lambda b: b.header('disk.img', size_field=base256_field(512, 12, negative=True))))


@case('sparse-header-without-gnu-magic', InvalidArchiveError, r'GNU magic')
def build_sparse_header_without_gnu_magic(ctx):
    return Z(evil_first(lambda b: b.header('disk.img', 0, typeflag=b'S', gnu_sparse={'realsize': 0},
                                           patch={257: b'ustar\x0000'})))


@case('truncated-mid-header', InvalidArchiveError, r'truncated')
def build_truncated_mid_header(ctx):
    tar = valid().tar_bytes()
    return zstd_compress(tar[:BLOCK + 4096 + 300])


@case('truncated-mid-data', InvalidArchiveError, r'truncated')
def build_truncated_mid_data(ctx):
    tar = valid().tar_bytes()
    return zstd_compress(tar[:BLOCK + 1000])


@case('truncated-no-end-marker', InvalidArchiveError, r'truncated|end-of-archive')
def build_truncated_no_end_marker(ctx):
    return Z(valid_builder(disk=DISK_CONTENT))


@case('truncated-compressed-stream', InvalidArchiveError, r'truncated|zstd')
def build_truncated_compressed_stream(ctx):
    data = Z(valid(), level=1)
    return data[:len(data) // 2]


@case('trailing-garbage', InvalidArchiveError, r'after the end')
def build_trailing_garbage(ctx):
    return Z(valid(lambda b: None).raw(b'#!/bin/sh\nrm -rf /\n' + b'\0' * 493))


@case('trailing-zeros-beyond-record-padding', InvalidArchiveError, r'after the end')
def build_trailing_zeros_beyond_record_padding(ctx):
    return Z(valid().raw(b'\0' * (2 * MIB)))


@case('not-zstd-plain-tar', InvalidArchiveError, r'zstd')
def build_not_zstd_plain_tar(ctx):
    return valid().tar_bytes()


@case('not-zstd-gzip', InvalidArchiveError, r'zstd')
def build_not_zstd_gzip(ctx):
    import gzip
    return gzip.compress(valid().tar_bytes())


@case('empty-input', InvalidArchiveError, r'truncated|zstd')
def build_empty_input(ctx):
    return b''


@case('pax-record-length-lies', InvalidArchiveError, r'pax header')
def build_pax_record_length_lies(ctx):
    return Z(evil_first(lambda b: b.pax(b'99 path=../x\n').file('disk.img', b'x')))


@case('pax-header-too-large', LimitExceededError, r'pax header')
def build_pax_header_too_large(ctx):
    return Z(evil_first(lambda b: b.header('./PaxHeaders/x', 64 * MIB, typeflag=b'x')))


@case('unsupported-sparse-version', InvalidArchiveError, r'unsupported GNU sparse format')
def build_unsupported_sparse_version(ctx):
    return Z(evil_first(lambda b: b.pax([('GNU.sparse.major', 2), ('GNU.sparse.minor', 0),
                                         ('GNU.sparse.realsize', 10)]).file('disk.img', b'x')))


# ---- item 7: zstd

@case('zstd-window-over-limit', LimitExceededError, r'window', limits=ImageLimits(max_window_size=1 * MIB))
def build_zstd_window_over_limit(ctx):
    return Z(valid(), window_log=24)


@case('zstd-window-2GiB-default-limits', LimitExceededError, r'window')
def build_zstd_window_2gib_default_limits(ctx):
    return zstd_cli_compress(valid().tar_bytes(), long_window=31)


@case('zstd-window-over-limit-in-second-frame', LimitExceededError, r'window',
      limits=ImageLimits(max_window_size=1 * MIB))
def build_zstd_window_over_limit_in_second_frame(ctx):
    tar = valid().tar_bytes()
    return zstd_compress(tar[:BLOCK]) + zstd_compress(tar[BLOCK:], window_log=24)


# ---- item 7: zstd frame integrity.  zstd has no end-of-stream marker beyond
# complete frames, so a stream cut inside a frame must be refused even when
# the tar it carries is already complete (the cut only lost zero padding, the
# checksum, or an empty final block).

TRAILER_ZEROS = 3000  # valid() ends with 3584 zero bytes: the end marker and record padding


def complete_tar():
    tar = valid().tar_bytes()
    assert tar[-(TRAILER_ZEROS + BLOCK):] == bytes(TRAILER_ZEROS + BLOCK), 'the tar must end in zeros'
    return tar


def final_block_frame(tar, tail=0):
    """One checksummed frame of ``tar`` whose last ``tail`` bytes alone make
    the final block: returns (frame, offset of the final block's header)."""
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=False)
    writer = cctx.stream_writer(out, closefd=False)
    writer.write(tar[:len(tar) - tail])
    writer.flush(zstandard.FLUSH_BLOCK)
    mark = len(out.getvalue())
    writer.write(tar[len(tar) - tail:])
    writer.flush(zstandard.FLUSH_FRAME)
    frame = out.getvalue()
    if not tail:
        assert len(frame) == mark + 3 + 4, 'expected an empty final block and a checksum'
    return frame, mark


def two_frames():
    """The tar in a first frame, all but its last zeros; those in a second frame."""
    tar = complete_tar()
    return zstd_compress(tar[:-TRAILER_ZEROS]), zstd_compress(tar[-TRAILER_ZEROS:])


def skippable_frame(payload, nibble=0):
    return struct.pack('<II', 0x184D2A50 | nibble, len(payload)) + payload


INSIDE_FRAME = r'truncated: the zstd stream ends inside a frame, in '


@case('zstd-cut-before-final-block', InvalidArchiveError, INSIDE_FRAME + 'a block header')
def build_zstd_cut_before_final_block(ctx):
    frame, mark = final_block_frame(complete_tar())
    return frame[:mark]


@case('zstd-cut-in-final-block-header', InvalidArchiveError, INSIDE_FRAME + 'a block header')
def build_zstd_cut_in_final_block_header(ctx):
    frame, mark = final_block_frame(complete_tar())
    return frame[:mark + 2]


@case('zstd-cut-in-final-block', InvalidArchiveError, INSIDE_FRAME + 'a block,')
def build_zstd_cut_in_final_block(ctx):
    frame, mark = final_block_frame(complete_tar(), tail=TRAILER_ZEROS)
    return frame[:mark + 3]  # the block header, not its content


@case('zstd-checksum-missing', InvalidArchiveError, INSIDE_FRAME + "the frame's content checksum")
def build_zstd_checksum_missing(ctx):
    return final_block_frame(complete_tar())[0][:-4]


@case('zstd-checksum-cut-short', InvalidArchiveError, INSIDE_FRAME + "the frame's content checksum")
def build_zstd_checksum_cut_short(ctx):
    return final_block_frame(complete_tar())[0][:-1]


@case('zstd-checksum-corrupted', InvalidArchiveError, r"zstd.*checksum")
def build_zstd_checksum_corrupted(ctx):
    frame = bytearray(final_block_frame(complete_tar())[0])
    frame[-2] ^= 0x10
    return bytes(frame)


@case('zstd-checksum-corrupted-in-first-frame', InvalidArchiveError, r"zstd.*checksum")
def build_zstd_checksum_corrupted_in_first_frame(ctx):
    first, second = two_frames()
    first = bytearray(first)
    first[-1] ^= 0x01
    return bytes(first) + second


@case('zstd-last-frame-cut-in-magic', InvalidArchiveError, INSIDE_FRAME + 'a frame magic number')
def build_zstd_last_frame_cut_in_magic(ctx):
    first, second = two_frames()
    return first + second[:2]


@case('zstd-last-frame-cut-in-header', InvalidArchiveError, INSIDE_FRAME + 'a frame header')
def build_zstd_last_frame_cut_in_header(ctx):
    first, second = two_frames()
    return first + second[:zstandard.frame_header_size(second) - 1]


@case('zstd-last-frame-cut-in-block', InvalidArchiveError, INSIDE_FRAME + 'a block')
def build_zstd_last_frame_cut_in_block(ctx):
    first, second = two_frames()
    return first + second[:zstandard.frame_header_size(second) + 3]


@case('zstd-trailing-partial-skippable-magic', InvalidArchiveError, INSIDE_FRAME + 'a frame magic number')
def build_zstd_trailing_partial_skippable_magic(ctx):
    return zstd_compress(complete_tar()) + skippable_frame(b'')[:3]


@case('zstd-trailing-zeros-shorter-than-a-magic', InvalidArchiveError, r'not a valid zstd stream')
def build_zstd_trailing_zeros_shorter_than_a_magic(ctx):
    return zstd_compress(complete_tar()) + b'\0\0\0'  # libzstd refuses a prefix of no magic


@case('zstd-trailing-garbage-after-last-frame', InvalidArchiveError, r'not a valid zstd stream')
def build_zstd_trailing_garbage_after_last_frame(ctx):
    return zstd_compress(complete_tar()) + b'#!/bin/sh\nrm -rf /\n'


@case('zstd-skippable-frame-cut-short', InvalidArchiveError, INSIDE_FRAME + 'a skippable frame')
def build_zstd_skippable_frame_cut_short(ctx):
    return zstd_compress(complete_tar()) + skippable_frame(b'metadata')[:-2]


def _register_frame_boundary_cuts():
    """A multi-frame stream cut between frames is a complete zstd stream:
    the tar inside is what tells it is short.  Frames end in the middle of
    the first member, after a header, inside the last member's padding and
    right before the end-of-archive marker."""
    tar = complete_tar()
    content_end = len(tar.rstrip(b'\0'))  # machine.json ends with '}'
    members_end = content_end + (-content_end % BLOCK)
    cuts = [BLOCK + 100, 2 * BLOCK + len(DISK_CONTENT), members_end - 200, members_end]
    for kept in range(1, len(cuts) + 1):
        def build(ctx, kept=kept):
            tar = complete_tar()
            frames = [zstd_compress(tar[a:b]) for a, b in zip([0] + cuts, cuts + [len(tar)])]
            return b''.join(frames[:kept])
        case('zstd-stream-cut-after-frame-%d-of-%d' % (kept, len(cuts) + 1), InvalidArchiveError,
             r'archive is truncated|lacks')(build)


_register_frame_boundary_cuts()


# ---- item 7: decompression bombs

@case('declared-size-beyond-member-limit', LimitExceededError, r'disk\.img.*exceeds the limit')
def build_declared_size_beyond_member_limit(ctx):
    return Z(evil_first(lambda b: b.header('disk.img', size_field=base256_field(2 ** 50, 12))))


@case('zero-bomb-beyond-small-member-limit', LimitExceededError, r'exceeds the limit',
      limits=ImageLimits(max_member_size=1 * MIB))
def build_zero_bomb_beyond_small_member_limit(ctx):
    return Z(with_members(lambda b: b.file('disk.img', b'\0' * (8 * MIB))))


@case('pax-size-beyond-member-limit', LimitExceededError, r'exceeds the limit')
def build_pax_size_beyond_member_limit(ctx):
    return Z(evil_first(lambda b: b.pax([('size', 10 ** 15)]).header('disk.img', 0)))


@case('total-written-beyond-limit', LimitExceededError, r'more than .* in total',
      limits=ImageLimits(max_member_size=1 * MIB, max_written_bytes=1 * MIB + MIB // 2))
def build_total_written_beyond_limit(ctx):
    return Z(RawTarBuilder().file('disk.img', pattern(MIB, 1)).file('layer.qcow2', pattern(MIB, 2))
             .file('machine.json', b'{"version": 1}').end())


@case('total-written-beyond-limit-sparse', LimitExceededError, r'in total',
      limits=ImageLimits(max_member_size=4 * MIB, max_written_bytes=96 * KIB))
def build_total_written_beyond_limit_sparse(ctx):
    entries = [(i * MIB, 32 * KIB) for i in range(4)]
    return Z(with_members(sparse_member('1.0', 'disk.img', 4 * MIB, entries, lambda o, n: pattern(n, o))))


@case('machine-json-over-limit', LimitExceededError, r'machine\.json.*exceeds the limit')
def build_machine_json_over_limit(ctx):
    return Z(with_members(lambda b: b.file('disk.img', DISK_CONTENT), machine=b' ' * (MIB + 1)))


@case('machine-json-over-small-limit', LimitExceededError, r'machine\.json',
      limits=ImageLimits(max_machine_json=100))
def build_machine_json_over_small_limit(ctx):
    return Z(with_members(lambda b: b.file('disk.img', DISK_CONTENT), machine=b'{"version": 1}' + b' ' * 200))


@case('machine-json-sparse-over-limit', LimitExceededError, r'machine\.json.*exceeds the limit')
def build_machine_json_sparse_over_limit(ctx):
    return Z(RawTarBuilder().file('disk.img', DISK_CONTENT).file('layer.qcow2', b'QFI\xfb')
             .old_gnu_sparse('machine.json', 2 * MIB, [(0, 14)], b'{"version": 1}').end())


# ---- item 7: sparse bombs, every layout

def _sparse_cases():
    for layout in LAYOUTS:
        def realsize_huge(ctx, layout=layout):
            return Z(with_members(sparse_member(layout, 'disk.img', 2 ** 60, [(0, 4096)])))
        case('sparse-%s-realsize-beyond-limit' % layout, LimitExceededError, r'exceeds the limit')(realsize_huge)

        def beyond(ctx, layout=layout):
            return Z(with_members(sparse_member(layout, 'disk.img', 8192, [(0, 512), (1 << 40, 512)])))
        case('sparse-%s-offset-beyond-realsize' % layout, UnsafeImageError, r'beyond the file size')(beyond)

        def end_beyond(ctx, layout=layout):
            return Z(with_members(sparse_member(layout, 'disk.img', 8192, [(0, 512), (8000, 512)])))
        case('sparse-%s-extent-ends-beyond-realsize' % layout, UnsafeImageError, r'beyond the file size')(end_beyond)

        def overlap(ctx, layout=layout):
            return Z(with_members(sparse_member(layout, 'disk.img', 8192, [(0, 1024), (512, 512)])))
        case('sparse-%s-overlapping' % layout, UnsafeImageError, r'overlap')(overlap)

        def disorder(ctx, layout=layout):
            return Z(with_members(sparse_member(layout, 'disk.img', 8192, [(4096, 512), (0, 512)])))
        case('sparse-%s-out-of-order' % layout, UnsafeImageError, r'out of order')(disorder)

        def short_data(ctx, layout=layout):
            # The map claims 2048 bytes of data, the member stores 512.
            return Z(with_members(sparse_member(layout, 'disk.img', 8192, [(0, 1024), (4096, 1024)],
                                                data=DISK_CONTENT[:512])))
        case('sparse-%s-map-sum-exceeds-stored' % layout, UnsafeImageError, r'describes')(short_data)

        def long_data(ctx, layout=layout):
            return Z(with_members(sparse_member(layout, 'disk.img', 8192, [(0, 512)],
                                                data=DISK_CONTENT[:3000])))
        case('sparse-%s-stored-exceeds-map-sum' % layout, UnsafeImageError, r'describes')(long_data)

        def too_many(ctx, layout=layout):
            entries = [(i * 1024, 16) for i in range(60)]
            return Z(with_members(sparse_member(layout, 'disk.img', 64 * KIB, entries,
                                                lambda o, n: pattern(n, o))))
        case('sparse-%s-entries-beyond-limit' % layout, LimitExceededError, r'entries',
             limits=ImageLimits(max_sparse_extents=50))(too_many)

    def numblocks_00(ctx):
        return Z(with_members(sparse_member('0.0', 'disk.img', 8192, [(0, 512)], numblocks=3)))
    case('sparse-0.0-numblocks-mismatch', InvalidArchiveError, r'numblocks')(numblocks_00)

    def numblocks_01(ctx):
        return Z(with_members(sparse_member('0.1', 'disk.img', 8192, [(0, 512)], numblocks=10 ** 18)))
    case('sparse-0.1-numblocks-mismatch', InvalidArchiveError, r'numblocks')(numblocks_01)

    def unpaired_00(ctx):
        return Z(with_members(sparse_member('0.0', 'disk.img', 8192, [(0, 512)], numblocks=False,
                                            extra_records=[('GNU.sparse.offset', 4096)])))
    case('sparse-0.0-unpaired-offset', InvalidArchiveError, r'pair')(unpaired_00)

    def odd_01(ctx):
        return Z(with_members(sparse_member('0.1', 'disk.img', 8192, [(0, 512)], numblocks=False,
                                            records=[('GNU.sparse.size', 8192), ('GNU.sparse.name', 'disk.img'),
                                                     ('GNU.sparse.map', '0,512,4096')])))
    case('sparse-0.1-odd-map', InvalidArchiveError, r'odd')(odd_01)

    def nondigit_01(ctx):
        return Z(with_members(sparse_member('0.1', 'disk.img', 8192, [(0, 512)], numblocks=False,
                                            records=[('GNU.sparse.size', 8192), ('GNU.sparse.name', 'disk.img'),
                                                     ('GNU.sparse.map', '0,-512')])))
    case('sparse-0.1-map-non-digits', InvalidArchiveError, r'decimal')(nondigit_01)

    def count_10(ctx):
        return Z(with_members(sparse_member('1.0', 'disk.img', 8192, [(0, 512)],
                                            map_text=sparse_10_map([(0, 512)], count=10 ** 15))))
    case('sparse-1.0-absurd-count', LimitExceededError, r'entries')(count_10)

    for label, text in (('hex', b'1\n0x10\n512\n'), ('negative', b'1\n0\n-512\n'), ('letters', b'one\n0\n512\n'),
                        ('spaces', b'1\n 0\n512\n'), ('empty-line', b'1\n\n512\n')):
        def nondigit_10(ctx, text=text):
            return Z(with_members(sparse_member('1.0', 'disk.img', 8192, [(0, 512)],
                                                map_text=text + b'\0' * (-len(text) % BLOCK))))
        case('sparse-1.0-map-%s' % label, InvalidArchiveError, r'decimal')(nondigit_10)

    def endless_10(ctx):
        # A map line that never ends: a run of digits through many blocks.
        return Z(with_members(sparse_member('1.0', 'disk.img', 8192, [(0, 512)],
                                            map_text=b'1\n' + b'7' * (64 * KIB - 2))))
    case('sparse-1.0-endless-number', InvalidArchiveError, r'malformed sparse map|decimal')(endless_10)

    def map_past_member_10(ctx):
        return Z(with_members(sparse_member('1.0', 'disk.img', 8192, [(0, 512)], size=100)))
    case('sparse-1.0-map-runs-past-member', InvalidArchiveError, r'runs past the member')(map_past_member_10)

    def gnu_ext_too_many(ctx):
        entries = [(i * 1024, 16) for i in range(4 + 21 * 3)]
        return Z(with_members(sparse_member('gnu', 'disk.img', 128 * KIB, entries, lambda o, n: pattern(n, o))))
    case('sparse-gnu-extension-blocks-beyond-limit', LimitExceededError, r'entries',
         limits=ImageLimits(max_sparse_extents=20))(gnu_ext_too_many)

    def gnu_empty_ext_chain(ctx):
        # Extension blocks that hold no entry but announce another: no entry
        # limit bounds the chain, and 40 MiB of them compress to almost nothing.
        blocks = [old_gnu_extension_block([], True)] * (80 * 1024) + [old_gnu_extension_block([], False)]
        return Z(with_members(sparse_member('gnu', 'disk.img', 8192, [(0, 512)], ext_blocks=blocks)))
    case('sparse-gnu-endless-empty-extension-blocks', InvalidArchiveError, r'extension',
         timeout=10)(gnu_empty_ext_chain)

    def gnu_realsize_negative(ctx):
        return Z(with_members(sparse_member('gnu', 'disk.img', base256_field(5, 12, negative=True), [(0, 512)])))
    case('sparse-gnu-negative-realsize', InvalidArchiveError, r'negative')(gnu_realsize_negative)


_sparse_cases()


# ---------------------------------------------------------------- the check

def _snapshot(ctx):
    return {'passwd': _passwd_digest()}


def _assert_contained(ctx, before):
    assert sorted(os.listdir(ctx.root)) == ['outside', 'parent'], os.listdir(ctx.root)
    assert os.listdir(ctx.parent) == ['staging'], os.listdir(ctx.parent)
    assert os.listdir(ctx.outside) == ['sentinel'], os.listdir(ctx.outside)
    st = os.lstat(ctx.sentinel)
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
    with open(ctx.sentinel, 'rb') as f:
        assert f.read() == SENTINEL
    for name in os.listdir(ctx.staging):
        assert name in MEMBERS, 'unexpected %r in the staging folder' % name
        st = os.lstat(os.path.join(ctx.staging, name))
        assert stat.S_ISREG(st.st_mode), '%s is not a regular file (mode %o)' % (name, st.st_mode)
        assert st.st_nlink == 1, '%s is hard-linked' % name
    assert _snapshot(ctx) == before
    assert not os.path.exists(os.path.join(ctx.root, 'escaped'))


@pytest.mark.parametrize('build, exc, keyword, limits', CASES)
def test_malicious_archive_is_refused(tmp_path, build, exc, keyword, limits):
    ctx = Ctx(tmp_path)
    os.mkdir(ctx.outside)
    with open(ctx.sentinel, 'wb') as f:
        f.write(SENTINEL)
    os.mkdir(ctx.parent)
    os.mkdir(ctx.staging)
    data = build(ctx)
    archive = os.path.join(ctx.root, 'image.tar.zst')
    with open(archive, 'wb') as f:
        f.write(data)
    before = _snapshot(ctx)
    kwargs = {} if limits is None else {'limits': limits}
    started = time.monotonic()
    with open(archive, 'rb') as f:
        with pytest.raises(exc) as info:
            extract_image_archive(f, ctx.staging, **kwargs)
    os.unlink(archive)
    assert info.type is exc, 'expected %s, got %r' % (exc.__name__, info.value)
    message = str(info.value)
    assert re.search(keyword, message, re.IGNORECASE), 'message %r lacks %r' % (message, keyword)
    assert time.monotonic() - started < 10
    _assert_contained(ctx, before)


# ---------------------------------------------------------------- controls

@pytest.mark.parametrize('layout', LAYOUTS)
def test_crafted_sparse_layouts_are_accepted(tmp_path, layout):
    """The builder's sparse layouts are right: the same shapes, made valid, load."""
    content = {0: pattern(700, 1), 5000: pattern(1000, 2), 9 * GIB: pattern(300, 3)}
    realsize = 9 * GIB + 4096
    entries = [(o, len(d)) for o, d in sorted(content.items())] + [(realsize, 0)]
    staging = str(tmp_path / 'staging')
    os.mkdir(staging)
    data = Z(with_members(sparse_member(layout, 'disk.img', realsize, entries,
                                        lambda o, n: content.get(o, b'')[:n])))
    archive = tmp_path / 'a.tar.zst'
    archive.write_bytes(data)
    with open(str(archive), 'rb') as f:
        result = extract_image_archive(f, staging)
    disk = result.members['disk.img']
    assert disk.size == realsize and disk.stored_bytes == 2000
    path = os.path.join(staging, 'disk.img')
    assert os.path.getsize(path) == realsize
    assert os.stat(path).st_blocks * 512 < 1 * MIB
    with open(path, 'rb') as f:
        for off, d in content.items():
            f.seek(off)
            assert f.read(len(d)) == d


def test_valid_crafted_image_and_odd_number_fields_are_accepted(tmp_path):
    """Controls for the corpus: the good image loads, including a pax ``size``
    override and a base-256 size field, a signed-sum checksum aside."""
    staging = str(tmp_path / 'staging')
    os.mkdir(staging)
    b = RawTarBuilder()
    b.pax([('size', 4096), ('mtime', '1.5')]).header('disk.img', 0).data(DISK_CONTENT)
    b.header('./layer.qcow2', size_field=base256_field(4, 12)).data(b'QFI\xfb')
    b.file('machine.json', b'{"version": 1}', magic=b'ustar  \0')
    archive = tmp_path / 'a.tar.zst'
    archive.write_bytes(b.end(record=10240).zst())
    with open(str(archive), 'rb') as f:
        result = extract_image_archive(f, staging)
    assert sorted(result.members) == sorted(MEMBERS)
    with open(os.path.join(staging, 'disk.img'), 'rb') as f:
        assert f.read() == DISK_CONTENT
    with open(os.path.join(staging, 'layer.qcow2'), 'rb') as f:
        assert f.read() == b'QFI\xfb'


def test_header_builder_matches_library_checksums():
    """build_header's default output is a header the reader's own parser accepts."""
    from ansible_collections.vmimage.qemu.plugins.module_utils._archive.tar_format import TarHeader
    h = TarHeader.parse(build_header('disk.img', 1234))
    assert h.name == b'disk.img' and h.size == 1234


def test_zstd_frame_missing_its_checksum_is_refused(tmp_path):
    staging = str(tmp_path / 'staging')
    os.mkdir(staging)
    data = valid().zst()
    archive = tmp_path / 'a.tar.zst'
    archive.write_bytes(data[:-4])  # the 4-byte content checksum ends the frame
    with open(str(archive), 'rb') as f:
        with pytest.raises(InvalidArchiveError, match="ends inside a frame, in the frame's content checksum"):
            extract_image_archive(f, staging)


def _load(tmp_path, data, name='a'):
    staging = str(tmp_path / (name + '-staging'))
    os.mkdir(staging)
    archive = tmp_path / (name + '.tar.zst')
    archive.write_bytes(data)
    with open(str(archive), 'rb') as f:
        return extract_image_archive(f, staging)


def test_zstd_frames_without_checksum_and_skippable_frames_load(tmp_path):
    """Controls for the frame-integrity cases: frames without a checksum,
    several frames, and skippable frames before, between and after them."""
    tar = complete_tar()
    no_checksum = zstd_compress(tar, checksum=False)
    assert not zstandard.get_frame_parameters(no_checksum).has_checksum
    assert sorted(_load(tmp_path, no_checksum, 'plain').members) == sorted(MEMBERS)
    first, second = two_frames()
    data = (skippable_frame(b'leading', 3) + first + skippable_frame(b'') + second
            + skippable_frame(b'trailing' * 100, 15))
    result = _load(tmp_path, data, 'skippable')
    assert sorted(result.members) == sorted(MEMBERS)
    assert result.compressed_bytes == len(data) and result.decompressed_bytes == len(tar)
    with open(str(tmp_path / 'skippable-staging' / 'disk.img'), 'rb') as f:
        assert f.read() == DISK_CONTENT


def test_every_cut_inside_the_last_frame_is_refused(tmp_path):
    """The tar is complete in the first frame; the last frame holds only
    zero padding.  Every cut inside that frame (magic, header, block header,
    block, checksum) is refused and leaves only allowed files in staging."""
    first, second = two_frames()
    assert len(_load(tmp_path, first + second, 'whole').members) == 3
    for cut in range(1, len(second)):
        staging = tmp_path / ('cut%d' % cut)
        os.mkdir(str(staging))
        archive = tmp_path / 'cut.tar.zst'
        archive.write_bytes(first + second[:cut])
        with open(str(archive), 'rb') as f:
            with pytest.raises(InvalidArchiveError, match=INSIDE_FRAME) as info:
                extract_image_archive(f, str(staging))
        assert 'after %d compressed bytes' % (len(first) + cut) in str(info.value)
        assert set(os.listdir(str(staging))) <= set(MEMBERS)
        os.unlink(str(archive))
