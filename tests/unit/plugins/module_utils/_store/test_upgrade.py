# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A store written by release 0.1.0 (format 1: no store.json, no reference
records; tests/fixtures/store-format-1.tar.zst, made by
tests/fixtures/make_store_format_1.py) is upgraded in place on the first
open by a writer: idempotently, crash-safely, and readable before that."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import ImageInUseError, StoreError
from ansible_collections.vmimage.qemu.plugins.module_utils._instance.instance import InstanceManager
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import STORE_FORMAT, ImageStore

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', '..', 'fixtures',
                       'store-format-1.tar.zst')
# The folder holding ansible_collections/ (six levels above _store/).
COLLECTIONS = os.path.abspath(os.path.join(os.path.dirname(sys.modules[ImageStore.__module__].__file__),
                                           *(['..'] * 6)))


@pytest.fixture
def old_store(tmp_path):
    zstd = subprocess.Popen(['zstd', '-dc', os.path.normpath(FIXTURE)], stdout=subprocess.PIPE)
    subprocess.run(['tar', '-S', '-C', str(tmp_path), '-xf', '-'], stdin=zstd.stdout, check=True)
    zstd.stdout.close()
    assert zstd.wait() == 0
    return str(tmp_path / 'store')


def _refs(store):
    return dict((d, [(r.kind, r.key) for r in store.refs.of(d)]) for d in store.refs.digests())


def test_readers_see_references_of_an_old_store_without_writing(old_store):
    before = sorted(os.listdir(old_store))
    store = ImageStore(old_store, create=False)
    assert store.format() == 1
    base = store.resolve('base')
    assert store.users(base) == ['instance vm1']
    assert store.describe(store.get_record(base))['instances'] == 1
    assert store.users(store.resolve('other')) == []
    assert sorted(os.listdir(old_store)) == before, 'a reader upgrades nothing'


def test_first_writer_upgrades_in_place_and_collects_old_debris(old_store):
    store = ImageStore(old_store)
    assert store.format() == STORE_FORMAT
    with open(os.path.join(old_store, 'store.json')) as f:
        assert json.load(f)['format'] == STORE_FORMAT
    base, other = store.resolve('base'), store.resolve('other')
    assert _refs(store) == {base: [('alias', 'base'), ('instance', 'vm1')], other: [('alias', 'other')]}
    for digest in (base, other):
        assert store.refs.last_used(digest) is not None, 'last use carried over'
    assert os.listdir(store.staging_dir) == [], "a dead 0.1.0 fetch's staging folder is gone"
    assert sorted(os.listdir(store.instances_dir)) == ['vm1'], "a dead 0.1.0 instance creation's folder is gone"
    # The rules hold on the upgraded store.
    with pytest.raises(ImageInUseError, match='instance vm1'):
        store.remove_alias('base')
    assert store.remove_alias('other') == (True, other)
    manager = InstanceManager(store)
    assert [r['name'] for r in manager.list()] == ['vm1']
    assert manager.remove('vm1').action == 'remove'
    assert store.remove_alias('base') == (True, base)
    assert _refs(store) == {}


def test_upgrade_is_idempotent(old_store):
    ImageStore(old_store)
    first = _refs(ImageStore(old_store))
    os.unlink(os.path.join(old_store, 'store.json'))  # as if killed just before the marker
    again = ImageStore(old_store)
    assert again.format() == STORE_FORMAT and _refs(again) == first


_KILL = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from ansible_collections.vmimage.qemu.plugins.module_utils._store import references
    from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore
    real_add = references.References.add
    count = [0]

    def add(self, *args):
        count[0] += 1
        if count[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_add(self, *args)

    references.References.add = add
    ImageStore(sys.argv[2])
''')


def test_upgrade_killed_midway_is_finished_by_the_next_writer(old_store):
    proc = subprocess.run([sys.executable, '-c', _KILL, COLLECTIONS, old_store], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not os.path.exists(os.path.join(old_store, 'store.json')), 'the marker is written last'
    assert ImageStore(old_store, create=False).format() == 1
    store = ImageStore(old_store)
    base = store.resolve('base')
    assert store.format() == STORE_FORMAT and ('instance', 'vm1') in _refs(store)[base]


def test_a_newer_or_damaged_format_is_refused(old_store):
    with open(os.path.join(old_store, 'store.json'), 'w') as f:
        json.dump({'format': STORE_FORMAT + 1}, f)
    with pytest.raises(StoreError, match='upgrade the collection'):
        ImageStore(old_store)
    with open(os.path.join(old_store, 'store.json'), 'w') as f:
        f.write('[]')
    with pytest.raises(StoreError, match='damaged'):
        ImageStore(old_store)


def test_a_new_store_starts_at_the_current_format(tmp_path):
    store = ImageStore(str(tmp_path / 'new'))
    assert store.format() == STORE_FORMAT and _refs(store) == {}
