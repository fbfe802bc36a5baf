# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Garbage collection of a store with real images, real instances, a real
QEMU holding an image, a real concurrent process fetching and creating
instances while another prunes, and du as the referee of bytes."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from support.image_factory import make_image_folder, pattern

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import InvalidOptionError
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
from ansible_collections.vmimage.qemu.plugins.module_utils._instance.instance import InstanceManager
from ansible_collections.vmimage.qemu.plugins.module_utils._store.prune import (
    PrunePolicy, parse_duration, parse_size, prune_store, tree_allocated,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore

QEMU = shutil.which('qemu-system-x86_64')
COLLECTIONS = os.path.abspath(os.path.join(os.path.dirname(sys.modules[ImageStore.__module__].__file__),
                                           *(['..'] * 6)))
NOW_POLICY = dict(min_age=0)


def _image(tmp_path, store, alias, seed, size=2 * 1024 * 1024):
    folder = make_image_folder(str(tmp_path / ('src-%s-%d' % (alias, seed))), disk_size=size,
                               chunks=[(0, pattern(65536, seed)), (size // 2, pattern(200000, seed + 7))])
    archive = str(tmp_path / ('%s-%d.tar.zst' % (alias, seed)))
    with open(archive, 'wb') as f:
        write_image_archive(folder, f)
    return fetch_image(store, archive, alias=alias).digest


def _du(path):
    out = subprocess.run(['du', '-s', '-B1', path], stdout=subprocess.PIPE, check=True).stdout
    return int(out.split()[0])


def _prune(store, check_mode=False, **options):
    return prune_store(store, PrunePolicy.from_options(store.root, **options), check_mode=check_mode)


@pytest.fixture
def store(tmp_path):
    return ImageStore(str(tmp_path / 'store'))


def test_rotation_removes_exactly_the_release_nothing_uses(tmp_path, store):
    manager = InstanceManager(store)
    r1 = _image(tmp_path, store, 'nightly', 1)
    r2 = _image(tmp_path, store, 'nightly', 2)
    manager.ensure_present('ci-1', 'nightly')
    r3 = _image(tmp_path, store, 'nightly', 3)
    assert store.resolve('nightly') == r3

    planned, would_be, _collected = _prune(store, check_mode=True, **NOW_POLICY)
    assert [v.digest for v in planned.removed] == [r1] and planned.removed[0].reason == 'unreferenced'
    assert os.path.isdir(store.image_path(r1)), 'check mode removes nothing'

    du_before = _du(store.root)
    plan, usage_after, _collected = _prune(store, **NOW_POLICY)
    du_after = _du(store.root)
    assert [v.digest for v in plan.removed] == [r1]
    assert not os.path.exists(store.image_path(r1))
    # du is the referee: what the run reports is what the disk says.
    assert plan.usage_before == du_before and usage_after == du_after
    assert plan.usage_before - usage_after == plan.freed_bytes == planned.freed_bytes
    assert would_be == usage_after, 'check mode predicted the same bytes'
    kept = dict((v.digest, v.reason) for v in plan.kept)
    assert kept == {r2: 'instance ci-1', r3: 'alias nightly'}
    assert store.refs.digests() == sorted([r2, r3]), 'the removed image took its records along'
    again, _after, _collected = _prune(store, **NOW_POLICY)
    assert again.removed == [], 'a second run removes nothing'


def _hold(path):
    """A real QEMU, paused, holding ``path`` (a layer and its backing disk) as a VM would."""
    proc = subprocess.Popen([QEMU, '-nodefaults', '-no-user-config', '-machine', 'pc', '-accel', 'tcg', '-S',
                             '-display', 'none', '-monitor', 'stdio',
                             '-drive', 'if=none,id=d0,format=qcow2,readonly=on,file.driver=file,file.filename=' + path,
                             '-device', 'virtio-blk-pci,drive=d0'],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.image_locks import is_in_use, is_locked
    deadline = time.monotonic() + 30
    while not (is_locked(path) or is_in_use(path)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    return proc


@pytest.mark.skipif(QEMU is None, reason='qemu-system-x86_64 not installed')
def test_budget_removes_least_recently_used_but_never_what_a_vm_holds(tmp_path, store):
    digests = [_image(tmp_path, store, 'img%d' % i, 10 + i) for i in range(5)]
    base = time.time() - 10 * 86400
    for i, digest in enumerate(digests):
        store.refs.touch(digest, when=base + i * 3600)  # img0 least recently used
    sizes = dict((d, tree_allocated(store.image_path(d))) for d in digests)
    budget = tree_allocated(store.root) - sizes[digests[1]] - sizes[digests[2]] + 4096
    vm = _hold(os.path.join(store.image_path(digests[0]), 'layer.qcow2'))
    try:
        checked, _after, _collected = _prune(store, check_mode=True, keep_below=budget, **NOW_POLICY)
        plan, usage_after, _collected = _prune(store, keep_below=budget, **NOW_POLICY)
    finally:
        vm.kill()
        vm.communicate()
    assert [v.digest for v in plan.removed] == [v.digest for v in checked.removed]
    assert sorted(v.digest for v in plan.removed) == sorted(digests[1:3])
    assert all(v.reason.startswith('over keep_below, least recently used') for v in plan.removed)
    kept = dict((v.digest, v.reason) for v in plan.kept)
    assert kept[digests[0]].startswith('held by pid %d (qemu-system-x86_64)' % vm.pid), kept
    assert usage_after <= budget and plan.usage_before - usage_after == plan.freed_bytes
    assert store.refs.last_used(digests[0]) > base + 86400, 'the running VM counted as a use'
    for alias in ('img1', 'img2'):
        assert store.get_alias(alias) is None, 'aliases go with their image'


def test_unused_for_expires_aliases_of_images_not_used_for_that_long(tmp_path, store):
    old = _image(tmp_path, store, 'old', 1)
    fresh = _image(tmp_path, store, 'fresh', 2)
    pinned = _image(tmp_path, store, 'pinned', 3)
    for digest in (old, pinned):
        store.refs.touch(digest, when=time.time() - 40 * 86400)
    plan, _after, _collected = _prune(store, unused_for='30d', keep=['pinned'], **NOW_POLICY)
    assert [(v.digest, v.reason) for v in plan.removed] == [(old, 'not used for 30d (alias old)')]
    assert store.get_alias('old') is None and store.aliases().keys() == {'fresh', 'pinned'}
    kept = dict((v.digest, v.reason) for v in plan.kept)
    assert kept == {fresh: 'alias fresh', pinned: 'in keep'}


def test_young_and_leased_images_are_kept(tmp_path, store):
    young = _image(tmp_path, store, 'young', 1)
    leased = _image(tmp_path, store, 'leased', 2)
    with store.lock():
        store.drop_alias_locked('young', young)
        store.drop_alias_locked('leased', leased)
    plan, _after, _collected = _prune(store)  # default min_age: 1h
    assert plan.removed == [] and [v.reason for v in plan.kept] == ['younger than min_age'] * 2
    lease = store.lease(leased)
    try:
        plan, _after, _collected = _prune(store, **NOW_POLICY)
        assert [v.digest for v in plan.removed] == [young]
        assert [(v.digest, v.reason) for v in plan.kept] == [(leased, 'in use by a running operation')]
    finally:
        lease.release()
    plan, _after, _collected = _prune(store, **NOW_POLICY)
    assert [v.digest for v in plan.removed] == [leased]


def _set_parent(store, child, parent):
    """Images with parents come with the layered store; the collector already
    follows the record's parent field, so the tests give one by hand."""
    folder = store.image_path(child)
    path = os.path.join(folder, 'image.json')
    os.chmod(folder, 0o755)
    os.chmod(path, 0o644)
    with open(path) as f:
        record = json.load(f)
    record['parent'] = parent
    with open(path, 'w') as f:
        json.dump(record, f)
    os.chmod(path, 0o444)
    os.chmod(folder, 0o555)


def test_children_go_before_parents_and_a_referenced_child_keeps_its_chain(tmp_path, store):
    a = _image(tmp_path, store, 'a', 1)
    b = _image(tmp_path, store, 'b', 2)
    c = _image(tmp_path, store, 'c', 3)
    _set_parent(store, b, a)
    _set_parent(store, c, b)
    with store.lock():
        store.drop_alias_locked('a', a)
        store.drop_alias_locked('b', b)
    plan, _after, _collected = _prune(store, **NOW_POLICY)
    assert plan.removed == []
    assert dict((v.digest, v.reason) for v in plan.kept) == {
        c: 'alias c', b: 'parent of %s' % c, a: 'parent of %s' % b}
    with store.lock():
        store.drop_alias_locked('c', c)
    plan, _after, _collected = _prune(store, **NOW_POLICY)
    assert [v.digest for v in plan.removed] == [c, b, a], 'leaf first'
    assert list(store.iter_records()) == []


def test_debris_of_killed_processes_is_collected(tmp_path, store):
    dead = os.path.join(store.staging_dir, 'fetch-1-dead')
    os.mkdir(dead)
    open(dead + '.lock', 'w').close()
    _plan, _after, collected = _prune(store, check_mode=True)
    assert collected == [] and os.path.isdir(dead), 'check mode collects nothing'
    _plan, _after, collected = _prune(store)
    assert collected == ['fetch-1-dead'] and os.listdir(store.staging_dir) == []


_ROTATE = textwrap.dedent('''
    import io, json, os, sys
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    from support.image_factory import make_image_folder, pattern
    from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive
    from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
    from ansible_collections.vmimage.qemu.plugins.module_utils._instance.instance import InstanceManager
    from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore
    store = ImageStore(sys.argv[3])
    work = sys.argv[4]
    manager = InstanceManager(store)
    for i in range(int(sys.argv[5])):
        folder = make_image_folder(os.path.join(work, 'r%d' % i), disk_size=1024 * 1024,
                                   chunks=[(0, pattern(4096, 100 + i))])
        archive = os.path.join(work, 'r%d.tar.zst' % i)
        with open(archive, 'wb') as f:
            write_image_archive(folder, f)
        fetch_image(store, archive, alias='rotating')
        manager.ensure_present('vm-%d' % i, 'rotating')
        if i % 2:
            manager.remove('vm-%d' % (i - 1))
    print(json.dumps(sorted(r['name'] for r in manager.list())))
''')


def test_prune_racing_fetches_and_instance_creation_never_breaks_them(tmp_path, store):
    rounds = 8
    tests_dir = os.path.abspath(os.path.join(os.path.dirname(__file__), *(['..'] * 4)))
    work = tmp_path / 'work'
    work.mkdir()
    proc = subprocess.Popen([sys.executable, '-c', _ROTATE, COLLECTIONS, tests_dir, store.root, str(work),
                             str(rounds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    prunes = 0
    while proc.poll() is None:
        _prune(store, **NOW_POLICY)
        prunes += 1
        time.sleep(0.02)  # a prune holds the store lock: leave the other process room to run
    out, err = proc.communicate()
    assert proc.returncode == 0, 'a fetch or an instance creation failed under prune: ' + err.decode()[-3000:]
    assert prunes > 1
    names = json.loads(out)
    manager = InstanceManager(store)
    for record in manager.list():
        assert store.get_record(record['digest']) is not None, 'every instance still has its image'
        assert manager.backing_chain(record['name'])[-1]['format'] == 'raw'
    plan, _after, _collected = _prune(store, **NOW_POLICY)
    alive = set(r['digest'] for r in manager.list()) | {store.resolve('rotating')}
    assert set(v.digest for v in plan.kept) == alive and plan.removed == []
    assert names == sorted(r['name'] for r in manager.list())
    for name in os.listdir(store.images_dir):
        assert sorted(os.listdir(os.path.join(store.images_dir, name))) == \
            ['disk.img', 'image.json', 'layer.qcow2', 'machine.json'], 'no half image'


@pytest.mark.parametrize('value, expected', [(90, 90), ('90', 90), ('15s', 15), ('2m', 120), ('1h', 3600),
                                             ('30d', 30 * 86400), (' 7 d ', 7 * 86400)])
def test_durations(value, expected):
    assert parse_duration(value, 'min_age') == expected


@pytest.mark.parametrize('value', ['1w', '-1', 'soon', '', True, 1.5, -3])
def test_bad_durations_name_the_option(value):
    with pytest.raises(InvalidOptionError, match='min_age'):
        parse_duration(value, 'min_age')


def test_sizes():
    assert parse_size(1000, 'keep_below') == 1000
    assert parse_size('200GiB', 'keep_below') == 200 * 1024 ** 3
    assert parse_size('1.5 KiB', 'keep_below') == 1536
    assert parse_size('80%', 'keep_below', filesystem_bytes=1000) == 800
    for bad in ('200GB', '101%', 'lots', -1, True):
        with pytest.raises(InvalidOptionError, match='keep_below'):
            parse_size(bad, 'keep_below', filesystem_bytes=1000)


def test_percentage_budget_is_of_the_stores_file_system(store):
    policy = PrunePolicy.from_options(store.root, keep_below='50%')
    st = os.statvfs(store.root)
    assert policy.keep_below == int(st.f_blocks * st.f_frsize * 0.5)


def test_incomplete_images_do_not_break_listing_and_are_collected_after_the_grace(tmp_path, store):
    good = _image(tmp_path, store, 'good', 1)
    broken = os.path.join(store.images_dir, 'e' * 64)
    os.mkdir(broken)
    with open(os.path.join(broken, 'disk.img'), 'wb') as f:
        f.write(b'\1' * 65536)
    damaged = os.path.join(store.images_dir, 'd' * 64)
    os.mkdir(damaged)
    with open(os.path.join(damaged, 'image.json'), 'w') as f:
        f.write('{"digest": ')
    assert [r['digest'] for r in store.iter_records()] == [good], 'one bad folder does not fail the listing'
    assert sorted(d for d, _path in store.incomplete_images()) == ['sha256:' + 'd' * 64, 'sha256:' + 'e' * 64]

    plan, _after, _collected = prune_store(store, PrunePolicy(min_age=0))  # debris_grace 1h: too young
    assert plan.removed == [] and os.path.isdir(broken)
    assert [v.reason for v in plan.kept if v.digest != good] == ['incomplete image younger than debris_grace'] * 2
    plan, usage_after, _collected = prune_store(store, PrunePolicy(min_age=0), debris_grace=0)
    assert sorted(v.reason for v in plan.removed) == ['incomplete image (no valid record)'] * 2
    assert os.listdir(store.images_dir) == [good[7:]]
    assert plan.usage_before - usage_after == plan.freed_bytes
