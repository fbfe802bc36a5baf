# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tests for the qcow2 table walk (refcount table, refcount blocks, L1, L2).

Every fixture is a real layer written by qemu-img / qemu-io; the attacks are
the shapes of qemu-iotests 060 and 080 patched into it with struct, located
by a table reader written here independently of the library.  Each attack is
also handed to ``qemu-img check``, which must call it corrupt (or refuse to
open it): the walk refuses nothing QEMU itself would accept as sound.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import io
import os
import shutil
import struct
import subprocess
import time
import tracemalloc

import pytest

from support.http_server import LocalHTTPServer
from support.image_factory import make_image_folder, pattern

from support.counting_reader import CountingReader

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import InvalidArchiveError
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.validator import validate_image_folder
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import GIB, MIB, ImageLimits
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.qcow2 import check_layer_file
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore

pytestmark = pytest.mark.skipif(shutil.which('qemu-img') is None or shutil.which('qemu-io') is None,
                                reason='qemu-img / qemu-io not installed')

COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00fffffffffffe00


# ---------------------------------------------------------------- fixtures ---

def run(*args, **kwargs):
    return subprocess.run([str(a) for a in args], check=True, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def make_disk(folder, size=64 * MIB):
    path = folder / 'disk.img'
    if not path.exists():
        with open(path, 'wb') as f:
            f.truncate(size)
    return path


def make_layer(folder, writes=(), options=(), size=None, name='layer.qcow2'):
    """A layer the way the packager makes it, then ``writes`` (qemu-io
    commands) applied by QEMU itself."""
    make_disk(folder)
    opts = ['backing_file=disk.img', 'backing_fmt=raw', 'lazy_refcounts=on'] + list(options)
    args = ['qemu-img', 'create', '-q', '-f', 'qcow2', '-o', ','.join(opts), name]
    if size is not None:
        args.append(size)
    run(*args, cwd=str(folder))
    if writes:
        io_args = ['qemu-io', '-f', 'qcow2']
        for command in writes:
            io_args += ['-c', command]
        run(*(io_args + [name]), cwd=str(folder))
    return folder / name


def data_layer(folder, **kwargs):
    # 64 KiB clusters: header 0x0, refcount table 0x10000, refcount block
    # 0x20000, L1 0x30000, L2 0x40000, data 0x50000 0x60000 0x70000.
    return make_layer(folder, writes=['write -P 0x41 0 128k', 'write -P 0x42 1M 64k'], **kwargs)


def compressed_layer(folder, name='layer.qcow2'):
    """A layer whose data clusters are compressed: qemu-img convert -c of a
    disk that differs from disk.img, written as an overlay of disk.img."""
    make_disk(folder)
    src = folder / 'src.img'
    shutil.copyfile(str(folder / 'disk.img'), str(src))
    with open(src, 'r+b') as f:
        f.seek(0)
        f.write(b'compressible ' * 40000)
        f.seek(8 * MIB)
        f.write(pattern(300000, 5))
        f.seek(20 * MIB)
        f.write(b'\x07' * (1 * MIB))
    run('qemu-img', 'convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-B', 'disk.img', '-F', 'raw',
        'src.img', name, cwd=str(folder))
    os.unlink(str(src))
    return folder / name


class Layout(object):
    """The tables of a qcow2 file, read without the library."""

    def __init__(self, path):
        with open(path, 'rb') as f:
            data = f.read()
        self.file_size = len(data)
        self.cluster_bits = struct.unpack_from('>I', data, 20)[0]
        self.cluster_size = 1 << self.cluster_bits
        self.size = struct.unpack_from('>Q', data, 24)[0]
        self.l1_size, self.l1_offset, self.rt_offset, self.rt_clusters = struct.unpack_from('>IQQI', data, 36)
        self.refcount_order = struct.unpack_from('>I', data, 96)[0]
        padded = data + bytes(2 * self.cluster_size)
        reftable = struct.unpack_from('>%dQ' % (self.rt_clusters * self.cluster_size // 8), padded,
                                      self.rt_offset)
        self.refblocks = [e & ~0x1ff for e in reftable if e]
        self.l1 = struct.unpack_from('>%dQ' % self.l1_size, padded, self.l1_offset)
        self.l2_tables = [e & OFFSET_MASK for e in self.l1 if e & OFFSET_MASK]
        # (L2 table offset, index, entry) of every nonzero L2 entry
        self.l2_entries = []
        for table in self.l2_tables:
            entries = struct.unpack_from('>%dQ' % (self.cluster_size // 8), padded, table)
            self.l2_entries += [(table, i, e) for i, e in enumerate(entries) if e]

    def data_entries(self):
        return [(t, i, e) for t, i, e in self.l2_entries if not e & COMPRESSED and e & OFFSET_MASK]

    def compressed_entries(self):
        return [(t, i, e) for t, i, e in self.l2_entries if e & COMPRESSED]

    def csize_shift(self):
        return 62 - (self.cluster_bits - 8)

    def refcount_offset(self, cluster_offset):
        """Byte offset of the 16-bit refcount of the cluster at ``cluster_offset``."""
        assert self.refcount_order == 4
        per_block = self.cluster_size // 2
        index = cluster_offset >> self.cluster_bits
        return self.refblocks[index // per_block] + 2 * (index % per_block)


def put(path, offset, fmt, value):
    with open(path, 'r+b') as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def get(path, offset, fmt):
    with open(path, 'rb') as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def qemu_img_check(path):
    proc = subprocess.run(['qemu-img', 'check', '-f', 'qcow2', str(path)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60, check=False)
    return proc.returncode, proc.stdout.decode('utf-8', 'replace')


def refused(path, **kwargs):
    with pytest.raises(InvalidArchiveError) as err:
        check_layer_file(str(path), **kwargs)
    assert err.value.kind == 'invalid_archive'
    text = str(err.value)
    assert text.startswith('layer.qcow2: '), text
    return text


# ------------------------------------------------------------ good layers ---

@pytest.mark.parametrize('options', [
    [],
    ['lazy_refcounts=off'],
    ['cluster_size=512'],
    ['cluster_size=4096'],
    ['cluster_size=2M'],
    ['refcount_bits=1'],
    ['refcount_bits=2'],
    ['refcount_bits=4'],
    ['refcount_bits=8'],
    ['refcount_bits=32'],
    ['refcount_bits=64'],
    ['cluster_size=4096', 'refcount_bits=1'],
])
def test_layers_with_data_written_by_qemu_are_accepted(tmp_path, options):
    writes = ['write -P 0x41 0 3M', 'write -P 0x42 10M 256k', 'write -z 20M 128k',
              'write -P 0x43 63M 1M', 'discard 10M 64k']
    layer = make_layer(tmp_path, writes=writes, options=options)
    assert qemu_img_check(layer)[0] == 0
    assert Layout(layer).data_entries()
    header = check_layer_file(str(layer))
    assert header.backing_file == 'disk.img'


def test_empty_layer_whose_l1_cluster_is_cut_short_is_accepted(tmp_path):
    # qemu-img create writes only the 8 used bytes of the L1 cluster.
    layer = make_layer(tmp_path)
    lay = Layout(layer)
    assert lay.file_size == lay.l1_offset + 8 and not lay.l2_tables
    check_layer_file(str(layer))


def test_layer_with_compressed_clusters_is_accepted(tmp_path):
    layer = compressed_layer(tmp_path)
    lay = Layout(layer)
    shift = lay.csize_shift()
    hosts = [(e & ((1 << shift) - 1)) >> lay.cluster_bits for _t, _i, e in lay.compressed_entries()]
    assert len(hosts) > len(set(hosts)), 'fixture must pack several compressed clusters per host cluster'
    assert qemu_img_check(layer)[0] == 0
    check_layer_file(str(layer))


def test_layer_with_many_shared_compressed_clusters_is_accepted(tmp_path):
    # Clusters of one repeated byte compress to ~100 bytes and pack by the
    # hundreds into one host cluster, past what one byte of the cluster map
    # counts.
    make_disk(tmp_path)
    src = tmp_path / 'src.img'
    shutil.copyfile(str(tmp_path / 'disk.img'), str(src))
    with open(src, 'r+b') as f:
        f.write(b'\x05' * (24 * MIB))
    run('qemu-img', 'convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-B', 'disk.img', '-F', 'raw',
        'src.img', 'layer.qcow2', cwd=str(tmp_path))
    layer = tmp_path / 'layer.qcow2'
    lay = Layout(layer)
    shift = lay.csize_shift()
    hosts = [(e & ((1 << shift) - 1)) >> lay.cluster_bits for _t, _i, e in lay.compressed_entries()]
    assert max(hosts.count(h) for h in set(hosts)) > 255
    assert qemu_img_check(layer)[0] == 0
    check_layer_file(str(layer))


def test_preallocated_standalone_image_is_accepted(tmp_path):
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=4096',
        'standalone.qcow2', '8M', cwd=str(tmp_path))
    check_layer_file(str(tmp_path / 'standalone.qcow2'), expected_backing=None)


def test_layer_after_rebase_and_resize_is_accepted(tmp_path):
    layer = data_layer(tmp_path)
    run('qemu-img', 'resize', '-q', '-f', 'qcow2', 'layer.qcow2', '3G', cwd=str(tmp_path))
    run('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x44 2G 64k', 'layer.qcow2', cwd=str(tmp_path))
    run('qemu-img', 'rebase', '-q', '-f', 'qcow2', '-u', '-b', 'disk.img', '-F', 'raw', 'layer.qcow2',
        cwd=str(tmp_path))
    check_layer_file(str(layer), limits=ImageLimits(max_virtual_size=4 * GIB))


def test_file_object_is_walked_and_its_position_kept(tmp_path):
    layer = data_layer(tmp_path)
    lay = Layout(layer)
    put(layer, lay.l1_offset, '>Q', COPIED | lay.rt_offset)
    buf = io.BytesIO(layer.read_bytes())
    buf.seek(77)
    with pytest.raises(InvalidArchiveError, match='L1 table at 0x30000, entry 0 points at 0x10000'):
        check_layer_file(buf, name='layer.qcow2')
    assert buf.tell() == 77


def test_walk_reads_tables_only_never_data(tmp_path):
    layer = make_layer(tmp_path, writes=['write -P 0x41 0 16M', 'write -P 0x42 40M 8M'])
    lay = Layout(layer)
    assert lay.file_size > 24 * MIB
    reader = CountingReader(layer.read_bytes())
    check_layer_file(reader, name='layer.qcow2')
    # header, refcount table, refcount block, L1, one L2 table
    assert reader.bytes_read <= 5 * lay.cluster_size
    assert reader.largest_request <= 2 * MIB


def test_walk_cost_of_a_layer_with_thousands_of_clusters(tmp_path):
    layer = make_layer(tmp_path, options=['cluster_size=4096'],
                       writes=['write -P 0x41 0 8M', 'write -P 0x42 32M 8M', 'write -P 0x43 60M 4M'])
    clusters = len(Layout(layer).data_entries())
    assert clusters > 4000
    start = time.perf_counter()
    check_layer_file(str(layer))
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, '%d clusters took %.3f s' % (clusters, elapsed)


def test_hostile_sparse_file_of_tiny_clusters_costs_no_memory(tmp_path):
    # 40 GiB of 512-byte clusters would be 80 million clusters; only the ones
    # the tables really point at may cost memory.
    layer = make_layer(tmp_path, options=['cluster_size=512'], writes=['write -P 0x41 0 64k'])
    lay = Layout(layer)
    with open(layer, 'r+b') as f:
        f.truncate(40 * GIB)
    far = 40 * GIB - 512
    put(layer, lay.rt_offset + 8 * (lay.rt_clusters * 512 // 8 - 1), '>Q', far)
    tracemalloc.start()
    try:
        text = refused(layer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 'the cluster at 0x%x (a refcount block) has refcount 0' % far in text
    assert peak < 4 * MIB, peak


# ---------------------------------------------------------------- attacks ---

def _l2_into_l1(path, lay):
    table, index, entry = lay.data_entries()[0]
    put(path, table + 8 * index, '>Q', COPIED | lay.l1_offset)
    return ['L2 table at 0x%x, entry %d points at 0x%x, inside the L1 table' % (table, index, lay.l1_offset)]


def _l2_into_refcount_table(path, lay):
    table, index, _e = lay.data_entries()[1]
    put(path, table + 8 * index, '>Q', COPIED | lay.rt_offset)
    return ['L2 table at 0x%x, entry %d points at 0x%x, inside the refcount table' % (table, index, lay.rt_offset)]


def _l2_into_header(path, lay):
    # offset 0 reads as unallocated; a header of two 512-byte clusters would
    # be needed, so aim at the L2 table itself instead (060: "L2 entry
    # pointing to its own table")
    table, index, _e = lay.data_entries()[0]
    put(path, table + 8 * index, '>Q', COPIED | table)
    return ['L2 table at 0x%x, entry %d points at 0x%x, already used as an L2 table' % (table, index, table)]


def _l1_at_refblock(path, lay):
    put(path, lay.l1_offset, '>Q', COPIED | lay.refblocks[0])
    return ['L1 table at 0x%x, entry 0 points at 0x%x, inside a refcount block' % (lay.l1_offset, lay.refblocks[0])]


def _l1_at_l1(path, lay):
    put(path, lay.l1_offset, '>Q', COPIED | lay.l1_offset)
    return ['L1 table at 0x%x, entry 0 points at 0x%x, inside the L1 table' % (lay.l1_offset, lay.l1_offset)]


def _reftable_at_l1(path, lay):
    put(path, lay.rt_offset + 8, '>Q', lay.l1_offset)
    return ['refcount table at 0x%x, entry 1 points at 0x%x, inside the L1 table' % (lay.rt_offset, lay.l1_offset)]


def _reftable_at_itself(path, lay):
    put(path, lay.rt_offset, '>Q', lay.rt_offset)
    return ['refcount table at 0x%x, entry 0 points at 0x%x, inside the refcount table'
            % (lay.rt_offset, lay.rt_offset)]


def _reftable_at_l2(path, lay):
    put(path, lay.rt_offset + 8, '>Q', lay.l2_tables[0])
    # The refcount table is walked first, so the L1 entry is the second user.
    return ['L1 table at 0x%x, entry 0 points at 0x%x, inside a refcount block' % (lay.l1_offset, lay.l2_tables[0])]


def _beyond_eof(cluster_size, file_size):
    return (file_size + 16 * cluster_size) & ~(cluster_size - 1)


def _l2_past_eof(path, lay):
    table, index, _e = lay.data_entries()[-1]
    target = _beyond_eof(lay.cluster_size, lay.file_size)
    put(path, table + 8 * index, '>Q', COPIED | target)
    return ['L2 table at 0x%x, entry %d points at 0x%x, beyond the end of the file (0x%x bytes)'
            % (table, index, target, lay.file_size)]


def _l1_past_eof(path, lay):
    target = 1 << 40
    put(path, lay.l1_offset, '>Q', COPIED | target)
    return ['L1 table at 0x%x, entry 0 points at 0x%x, beyond the end of the file' % (lay.l1_offset, target)]


def _reftable_past_eof(path, lay):
    target = _beyond_eof(lay.cluster_size, lay.file_size)
    put(path, lay.rt_offset + 8, '>Q', target)
    return ['refcount table at 0x%x, entry 1 points at 0x%x, beyond the end of the file'
            % (lay.rt_offset, target)]


def _l1_misaligned(path, lay):
    target = lay.l2_tables[0] + 0x200
    put(path, lay.l1_offset, '>Q', COPIED | target)
    return ['L1 table at 0x%x, entry 0 points at 0x%x, not aligned to the cluster size 65536'
            % (lay.l1_offset, target)]


def _l2_misaligned(path, lay):
    table, index, entry = lay.data_entries()[0]
    target = (entry & OFFSET_MASK) + 0x1200
    put(path, table + 8 * index, '>Q', COPIED | target)
    return ['L2 table at 0x%x, entry %d points at 0x%x, not aligned' % (table, index, target)]


def _reftable_misaligned(path, lay):
    target = lay.refblocks[0] + 0x400
    put(path, lay.rt_offset, '>Q', target)
    return ['refcount table at 0x%x, entry 0 points at 0x%x, not aligned' % (lay.rt_offset, target)]


def _l1_reserved(path, lay):
    value = lay.l1[0] | 1 << 57
    put(path, lay.l1_offset, '>Q', value)
    return ['L1 table at 0x%x, entry 0 has reserved bits set (0x%016x)' % (lay.l1_offset, value)]


def _l2_reserved(path, lay):
    table, index, entry = lay.data_entries()[0]
    put(path, table + 8 * index, '>Q', entry | 1 << 3)
    return ['L2 table at 0x%x, entry %d has reserved bits set' % (table, index)]


def _reftable_reserved(path, lay):
    put(path, lay.rt_offset, '>Q', lay.refblocks[0] | 1)
    return ['refcount table at 0x%x, entry 0 has reserved bits set' % lay.rt_offset]


def _l2_duplicate(path, lay):
    (table, first, entry), (_t, second, _e) = lay.data_entries()[:2]
    put(path, table + 8 * second, '>Q', entry)
    return ['L2 table at 0x%x, entry %d points at 0x%x, already used as a data cluster (a second reference)'
            % (table, second, entry & OFFSET_MASK)]


def _data_refcount_zero(path, lay):
    _t, _i, entry = lay.data_entries()[1]
    target = entry & OFFSET_MASK
    put(path, lay.refcount_offset(target), '>H', 0)
    index = target >> lay.cluster_bits
    return ['refcount block at 0x%x, entry %d: the cluster at 0x%x (a data cluster) has refcount 0'
            % (lay.refblocks[0], index, target)]


def _l2_table_refcount_zero(path, lay):
    target = lay.l2_tables[0]
    put(path, lay.refcount_offset(target), '>H', 0)
    return ['refcount block at 0x%x, entry %d: the cluster at 0x%x (an L2 table) has refcount 0'
            % (lay.refblocks[0], target >> lay.cluster_bits, target)]


def _refblock_emptied(path, lay):
    put(path, lay.rt_offset, '>Q', 0)
    return ['refcount table at 0x%x, entry 0 is empty: the cluster at 0x0 (the header cluster) has refcount 0'
            % lay.rt_offset]


def _data_at_unused_cluster(path, lay):
    # A cluster inside the file that no refcount counts (qemu-io's image
    # ends at the last data cluster, so make room first).
    table, index, _e = lay.data_entries()[0]
    target = lay.file_size
    with open(path, 'r+b') as f:
        f.truncate(lay.file_size + lay.cluster_size)
    put(path, table + 8 * index, '>Q', COPIED | target)
    return ['the cluster at 0x%x (a data cluster) has refcount 0' % target]


def _snapshot_offset_misaligned(path, lay):
    put(path, 64, '>Q', lay.cluster_size + 0x200)
    return ['snapshots_offset 0x10200 is not a multiple of the cluster size 65536']


DATA_ATTACKS = [
    ('l2-entry-into-l1-table', _l2_into_l1),
    ('l2-entry-into-refcount-table', _l2_into_refcount_table),
    ('l2-entry-into-its-own-table', _l2_into_header),
    ('l1-entry-at-refcount-block', _l1_at_refblock),
    ('l1-entry-at-l1-table', _l1_at_l1),
    ('refcount-table-entry-at-l1-table', _reftable_at_l1),
    ('refcount-table-entry-at-itself', _reftable_at_itself),
    ('refcount-table-entry-at-l2-table', _reftable_at_l2),
    ('l2-entry-past-eof', _l2_past_eof),
    ('l1-entry-past-eof', _l1_past_eof),
    ('refcount-table-entry-past-eof', _reftable_past_eof),
    ('l1-entry-misaligned', _l1_misaligned),
    ('l2-entry-misaligned', _l2_misaligned),
    ('refcount-table-entry-misaligned', _reftable_misaligned),
    ('l1-entry-reserved-bits', _l1_reserved),
    ('l2-entry-reserved-bits', _l2_reserved),
    ('refcount-table-entry-reserved-bits', _reftable_reserved),
    ('l2-duplicate-data-cluster', _l2_duplicate),
    ('data-cluster-refcount-zero', _data_refcount_zero),
    ('l2-table-refcount-zero', _l2_table_refcount_zero),
    ('refcount-table-entry-emptied', _refblock_emptied),
    ('data-cluster-never-counted', _data_at_unused_cluster),
    ('snapshot-offset-misaligned-without-snapshots', _snapshot_offset_misaligned),
]


@pytest.mark.parametrize('attack', [a[1] for a in DATA_ATTACKS], ids=[a[0] for a in DATA_ATTACKS])
def test_table_attacks_are_refused(tmp_path, attack):
    layer = data_layer(tmp_path)
    check_layer_file(str(layer))
    fragments = attack(layer, Layout(layer))
    text = refused(layer)
    for fragment in fragments:
        assert fragment in text


@pytest.mark.parametrize('attack', [a[1] for a in DATA_ATTACKS], ids=[a[0] for a in DATA_ATTACKS])
def test_qemu_img_check_agrees_the_attacks_are_corrupt(tmp_path, attack):
    layer = data_layer(tmp_path)
    attack(layer, Layout(layer))
    # 2: corruptions found; 1: QEMU could not even open or check the image.
    rc, output = qemu_img_check(layer)
    assert rc in (1, 2), output
    if rc == 2:
        assert 'ERROR' in output or 'corruption' in output, output


def test_snapshot_offset_beyond_any_file_offset_is_refused(tmp_path):
    layer = data_layer(tmp_path)
    put(layer, 64, '>Q', 1 << 63)
    assert 'snapshots_offset 0x8000000000000000 is beyond any file offset' in refused(layer)
    assert qemu_img_check(layer)[0] == 1


def _big_layer(folder):
    # 1 GiB needs two L1 entries with 64 KiB clusters.
    return make_layer(folder, size='1G', writes=['write -P 0x41 0 64k', 'write -P 0x42 600M 64k'])


def test_l1_duplicate_l2_table_is_refused(tmp_path):
    layer = _big_layer(tmp_path)
    lay = Layout(layer)
    assert lay.l1_size == 2 and len(lay.l2_tables) == 2
    put(layer, lay.l1_offset + 8, '>Q', lay.l1[0])
    text = refused(layer)
    assert ('L1 table at 0x%x, entry 1 points at 0x%x, already used as an L2 table (a second reference)'
            % (lay.l1_offset, lay.l2_tables[0])) in text
    assert qemu_img_check(layer)[0] == 2


def test_l1_entry_beyond_the_virtual_size_is_refused(tmp_path):
    layer = data_layer(tmp_path)
    lay = Layout(layer)
    # A second L1 entry (l1_size may exceed the need), aimed at the second
    # L2-sized cluster QEMU never allocated there.
    put(layer, 36, '>I', 2)
    spare = lay.data_entries()[-1][2] & OFFSET_MASK
    put(layer, lay.l1_offset + 8, '>Q', COPIED | spare)
    text = refused(layer)
    assert ('L1 table at 0x%x, entry 1 points at 0x%x, but the entry maps guest offsets beyond the virtual '
            'size' % (lay.l1_offset, spare)) in text


def test_header_tables_overlapping_each_other_are_refused(tmp_path):
    layer = data_layer(tmp_path)
    lay = Layout(layer)
    # Three clusters of refcount table reach over the L1 table at 0x30000
    # (the refcount block at 0x20000 is only known once the table is read).
    put(layer, 56, '>I', 3)
    text = refused(layer)
    assert 'refcount table at 0x%x (%d bytes) overlaps the L1 table at 0x%x' \
        % (lay.rt_offset, 3 * lay.cluster_size, lay.l1_offset) in text
    assert qemu_img_check(layer)[0] in (1, 2)


def test_l1_table_on_the_refcount_table_is_refused(tmp_path):
    layer = data_layer(tmp_path)
    lay = Layout(layer)
    put(layer, 40, '>Q', lay.rt_offset)
    text = refused(layer)
    assert 'refcount table at 0x%x (%d bytes) overlaps the L1 table at 0x%x' \
        % (lay.rt_offset, lay.cluster_size, lay.rt_offset) in text
    assert qemu_img_check(layer)[0] in (1, 2)


def _compressed(folder):
    layer = compressed_layer(folder)
    return layer, Layout(layer)


def test_compressed_entry_into_l1_table_is_refused(tmp_path):
    layer, lay = _compressed(tmp_path)
    table, index, entry = lay.compressed_entries()[0]
    shift = lay.csize_shift()
    forged = (entry & ~((1 << shift) - 1)) | lay.l1_offset + 0x100
    put(layer, table + 8 * index, '>Q', forged)
    text = refused(layer)
    assert 'L2 table at 0x%x, entry %d points at 0x%x (compressed, ' % (table, index, lay.l1_offset + 0x100) in text
    assert 'inside the L1 table' in text
    assert qemu_img_check(layer)[0] == 2


def test_compressed_entry_past_eof_is_refused(tmp_path):
    layer, lay = _compressed(tmp_path)
    table, index, entry = lay.compressed_entries()[-1]
    shift = lay.csize_shift()
    target = lay.file_size + 5 * lay.cluster_size + 0x123
    put(layer, table + 8 * index, '>Q', (entry & ~((1 << shift) - 1)) | target)
    text = refused(layer)
    assert 'L2 table at 0x%x, entry %d points at 0x%x (compressed, ' % (table, index, target) in text
    assert 'beyond the end of the file' in text
    assert qemu_img_check(layer)[0] == 2


def test_compressed_entry_with_copied_flag_is_refused(tmp_path):
    layer, lay = _compressed(tmp_path)
    table, index, entry = lay.compressed_entries()[0]
    put(layer, table + 8 * index, '>Q', entry | COPIED)
    text = refused(layer)
    assert 'L2 table at 0x%x, entry %d describes compressed data with the copied flag set' % (table, index) in text
    assert qemu_img_check(layer)[0] == 2


def test_compressed_cluster_shared_beyond_its_refcount_is_refused(tmp_path):
    layer, lay = _compressed(tmp_path)
    shift = lay.csize_shift()
    hosts = [(e & ((1 << shift) - 1)) & ~(lay.cluster_size - 1) for _t, _i, e in lay.compressed_entries()]
    host = max(set(hosts), key=hosts.count)
    where = lay.refcount_offset(host)
    refcount = get(layer, where, '>H')
    assert refcount >= hosts.count(host) > 1
    put(layer, where, '>H', refcount - 1)
    text = refused(layer)
    assert 'the cluster at 0x%x holds compressed data of %d clusters but has refcount %d' \
        % (host, refcount, refcount - 1) in text
    assert qemu_img_check(layer)[0] == 2


def test_data_cluster_inside_compressed_data_is_refused(tmp_path):
    layer, lay = _compressed(tmp_path)
    shift = lay.csize_shift()
    _t, _i, centry = lay.compressed_entries()[0]
    host = (centry & ((1 << shift) - 1)) & ~(lay.cluster_size - 1)
    table, index, _e = lay.compressed_entries()[-1]
    put(layer, table + 8 * index, '>Q', COPIED | host)
    text = refused(layer)
    assert 'L2 table at 0x%x, entry %d points at 0x%x, already used for compressed data' % (table, index, host) \
        in text
    assert qemu_img_check(layer)[0] == 2


# ------------------------------------------------------- store and folder ---

def _folder_with(tmp_path, name, attack):
    folder = make_image_folder(str(tmp_path / name), disk_size=4 * MIB)
    os.unlink(os.path.join(folder, 'layer.qcow2'))
    layer = data_layer(tmp_path / name, size='4M')
    if attack is not None:
        attack(layer, Layout(layer))
    return folder


def test_image_folder_validation_walks_the_tables(tmp_path):
    good = _folder_with(tmp_path, 'good', None)
    assert validate_image_folder(good, use_qemu_img=False).virtual_size == 4 * MIB
    bad = _folder_with(tmp_path, 'bad', _l1_at_refblock)
    with pytest.raises(InvalidArchiveError, match='L1 table at 0x30000, entry 0 points at 0x20000, '
                                                  'inside a refcount block'):
        validate_image_folder(bad, use_qemu_img=False)


def test_fetch_without_qemu_img_refuses_a_corrupt_layer_and_keeps_the_store(tmp_path):
    store = ImageStore(str(tmp_path / 'store'), use_qemu_img=False)
    with LocalHTTPServer() as server:
        good = io.BytesIO()
        good_digest = write_image_archive(_folder_with(tmp_path, 'good', None), good).digest
        good_url = server.add('/good.tar.zst', good.getvalue())
        assert fetch_image(store, good_url, alias='base').digest == good_digest
        before = (sorted(os.listdir(store.images_dir)), store.aliases())

        bad = io.BytesIO()
        write_image_archive(_folder_with(tmp_path, 'bad', _l2_into_l1), bad)
        bad_url = server.add('/bad.tar.zst', bad.getvalue())
        with pytest.raises(InvalidArchiveError) as err:
            fetch_image(store, bad_url, alias='bad')
        assert err.value.kind == 'invalid_archive'
        assert 'layer.qcow2: L2 table at 0x40000, entry 0 points at 0x30000, inside the L1 table' in str(err.value)
        after_bad = (sorted(os.listdir(store.images_dir)), store.aliases())
        assert after_bad == before, 'a refused image must leave the store as it was'
        assert os.listdir(store.staging_dir) == []

        # A layer full of compressed clusters is as welcome as before.
        compressed = io.BytesIO()
        folder = make_image_folder(str(tmp_path / 'compressed'), disk_size=64 * MIB)
        os.unlink(os.path.join(folder, 'layer.qcow2'))
        compressed_layer(tmp_path / 'compressed')
        compressed_digest = write_image_archive(folder, compressed).digest
        compressed_url = server.add('/compressed.tar.zst', compressed.getvalue())
        assert fetch_image(store, compressed_url, alias='packed').digest == compressed_digest
    assert len(os.listdir(store.images_dir)) == 2
