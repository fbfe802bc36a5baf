# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The zstd frame tracker against libzstd's own idea of where frames end.

The tracker reads only frame and block headers; libzstd (a decompressobj per
frame, whose ``eof`` and ``unused_data`` say where the frame ended) is the
independent reference.  Every prefix of a stream mixing the frame shapes the
format allows must be called complete exactly when it ends on a frame
boundary, however the bytes are chunked.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import io
import random
import shutil
import struct
import subprocess

import pytest
import zstandard

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import InvalidArchiveError
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.zstd_codec import ZstdFrameTracker

from support.image_factory import zstd_cli_compress, zstd_compress

SKIPPABLE = 0x184D2A50


def noise(length, seed):
    return random.Random(seed).getrandbits(8 * length).to_bytes(length, 'little')


def skippable(payload, nibble=0):
    return struct.pack('<II', SKIPPABLE | nibble, len(payload)) + payload


def frame_ends(stream, dict_data=None):
    """Offsets where each frame ends, found by libzstd (skippable frames by
    their size field, which libzstd's decompressobj does not report)."""
    ends = []
    pos = 0
    while pos < len(stream):
        magic = struct.unpack('<I', stream[pos:pos + 4])[0]
        if magic & 0xFFFFFFF0 == SKIPPABLE:
            pos += 8 + struct.unpack('<I', stream[pos + 4:pos + 8])[0]
        else:
            dobj = zstandard.ZstdDecompressor(dict_data=dict_data).decompressobj()
            dobj.decompress(stream[pos:])
            assert dobj.eof, 'reference decoder did not finish the frame at %d' % pos
            pos = len(stream) - len(dobj.unused_data)
        ends.append(pos)
    return ends


def tracked(stream, chunk):
    tracker = ZstdFrameTracker()
    for i in range(0, len(stream), chunk):
        tracker.feed(memoryview(stream)[i:i + chunk] if i % 2 else stream[i:i + chunk])
    return tracker


def fcs8_frame():
    """A hand-made frame declaring an 8-byte content size (0) and holding one
    empty raw last block: no compressor writes this field for small data."""
    return struct.pack('<IBB', 0xFD2FB528, 0xC0, 0x40) + bytes(8) + b'\x01\x00\x00'


def small_blocks_frame(data):
    """A frame flushed every few hundred bytes: many small blocks of every
    type, as a streaming encoder writes."""
    out = io.BytesIO()
    writer = zstandard.ZstdCompressor(write_checksum=True).stream_writer(out, closefd=False)
    rnd = random.Random(9)
    pos = 0
    while pos < len(data):
        step = rnd.choice((1, 2, 7, 100, 700, 3000))
        writer.write(data[pos:pos + step])
        writer.flush(zstandard.FLUSH_BLOCK)
        pos += step
    writer.flush(zstandard.FLUSH_FRAME)
    return out.getvalue()


def mixed_stream():
    data = noise(70000, 5)
    samples = [(b'sample %d ' % i) * 20 + noise(8, i) for i in range(300)]
    trained = zstandard.train_dictionary(1024, samples)
    parts = [
        skippable(b'leading metadata', 7),
        zstd_compress(data[:300]),                                       # raw blocks, checksum
        zstd_compress(bytes(300000), checksum=False),                     # RLE blocks, no checksum
        zstandard.ZstdCompressor(write_content_size=True).compress(b''),  # single segment, 1-byte size
        zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(data[:400] * 3),
        zstandard.ZstdCompressor(write_content_size=True).compress(data + bytes(1000)),  # 4-byte size
        skippable(b''),
        zstandard.ZstdCompressor(dict_data=trained, write_dict_id=True, write_checksum=True).compress(samples[1]),
        fcs8_frame(),
        zstd_compress(b'tail ' * 20000),                                  # compressed blocks
        small_blocks_frame(data[:20000] + bytes(20000) + b'text ' * 4000),
        skippable(b'trailing'),
    ]
    return b''.join(parts), trained


def test_reference_agrees_on_the_hand_made_frame():
    assert zstandard.ZstdDecompressor().decompressobj().decompress(fcs8_frame()) == b''
    assert zstandard.get_frame_parameters(fcs8_frame()).content_size == 0


@pytest.fixture(scope='module')
def mixed():
    stream, trained = mixed_stream()
    dctx = zstandard.ZstdDecompressor(dict_data=trained)
    assert dctx.stream_reader(stream, read_across_frames=True).read()  # libzstd takes the whole stream
    return stream, set([0] + frame_ends(stream, trained))


@pytest.mark.parametrize('chunk', [1, 3, 4, 4096, 'mixed'])
def test_every_prefix_is_complete_exactly_at_frame_ends(mixed, chunk):
    """One tracker fed chunk by chunk: with 1-byte chunks, every prefix is
    checked; mixed chunk sizes end chunks at every distance from a header."""
    stream, ends = mixed
    rnd = random.Random(11)
    tracker = ZstdFrameTracker()
    fed = 0
    while fed < len(stream):
        assert tracker.at_frame_boundary == (fed in ends), 'prefix of %d bytes (chunks of %s)' % (fed, chunk)
        size = chunk if chunk != 'mixed' else rnd.choice((1, 2, 3, 5, 8, 64, 333, 999, 4096))
        piece = stream[fed:fed + size]
        tracker.feed(memoryview(piece) if fed % 2 else piece)
        fed += len(piece)
    tracker.check_complete()
    assert (tracker.frames, tracker.skippable_frames, tracker.checksummed_frames) == (9, 3, 5)
    assert tracker.offset == len(stream)


@pytest.mark.parametrize('chunk', [4096, 1 << 20])
def test_prefixes_near_frame_ends_in_large_chunks(mixed, chunk):
    """Cuts next to frame ends and headers, whatever the chunk alignment."""
    stream, ends = mixed
    rnd = random.Random(chunk)
    cuts = set(rnd.randrange(len(stream)) for _dummy in range(500))
    cuts |= set(e + d for e in ends for d in range(-5, 20))
    for cut in sorted(c for c in cuts if 0 <= c <= len(stream)):
        tracker = tracked(stream[:cut], chunk)
        assert tracker.at_frame_boundary == (cut in ends), 'prefix of %d bytes (chunks of %d)' % (cut, chunk)


def test_cuts_name_where_the_stream_stops():
    frame = zstd_compress(b'some data ' * 1000)
    header = zstandard.frame_header_size(frame)
    expectations = [
        (2, 'frame magic number'),
        (4, 'frame header'),
        (header - 1, 'frame header'),
        (header, 'block header'),
        (header + 2, 'block header'),
        (header + 4, 'a block,'),
        (len(frame) - 4, 'checksum'),
        (len(frame) - 1, 'checksum'),
    ]
    for cut, where in expectations:
        tracker = tracked(frame[:cut], 4096)
        with pytest.raises(InvalidArchiveError) as info:
            tracker.check_complete()
        message = str(info.value)
        assert 'ends inside a frame' in message and where in message, (cut, message)
        assert 'after %d compressed bytes' % cut in message
    with pytest.raises(InvalidArchiveError, match='skippable frame'):
        tracked(skippable(b'12345678')[:10], 4096).check_complete()


@pytest.mark.parametrize('garbage, problem', [
    (b'\x28\xb5\x2f\xfc more', r'unknown frame magic number 0xfc2fb528 at compressed byte 100'),
    (b'\x28\xb5\x2f\xfd\x08' + bytes(16), r'reserved bit set in a frame header at compressed byte 104'),
    (b'\x28\xb5\x2f\xfd\x00\x40\x07\x00\x00', r'reserved block type at compressed byte 106'),
])
def test_unfollowable_structure_is_reported_at_the_end_only(garbage, problem):
    stream = skippable(bytes(92)) + garbage  # the garbage starts at byte 100
    tracker = ZstdFrameTracker()
    tracker.feed(stream)  # remembering the problem, not raising: the decoder's error comes first
    assert not tracker.at_frame_boundary
    with pytest.raises(InvalidArchiveError, match='not a valid zstd stream: ' + problem):
        tracker.check_complete()


def test_empty_input_is_between_frames():
    tracker = ZstdFrameTracker()
    tracker.feed(b'')
    tracker.check_complete()
    assert tracker.frames == 0


@pytest.mark.skipif(not shutil.which('zstd'), reason='needs the zstd CLI')
@pytest.mark.parametrize('args, frames, checksummed', [
    ([], 1, 1),
    (['--no-check'], 1, 0),
    (['-T2'], 1, 1),          # multi-threaded zstd still writes one frame
    (['-T2', '-19'], 1, 1),
])
def test_zstd_cli_streams(args, frames, checksummed):
    data = noise(200000, 3) + bytes(3 << 20)
    stream = zstd_cli_compress(data, extra=args)
    tracker = tracked(stream, 65536)
    tracker.check_complete()
    assert (tracker.frames, tracker.skippable_frames, tracker.checksummed_frames) == (frames, 0, checksummed)


@pytest.mark.skipif(not shutil.which('pzstd'), reason='needs pzstd')
def test_pzstd_stream_of_frames_and_skippable_frames():
    """pzstd writes one frame per chunk, each announced by a skippable frame."""
    data = noise(1 << 20, 4) * 10
    stream = subprocess.run(['pzstd', '-q', '-c', '-p', '2', '-3'], input=data, check=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout
    tracker = tracked(stream, 65536)
    tracker.check_complete()
    assert tracker.frames >= 2 and tracker.skippable_frames == tracker.frames
    for end in frame_ends(stream):
        assert tracked(stream[:end], 65536).at_frame_boundary
        assert not tracked(stream[:end - 1], 65536).at_frame_boundary
