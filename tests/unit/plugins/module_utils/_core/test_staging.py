# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one staging protocol (WorkArea/WorkFolder) and the record
temporaries, against real processes killed with SIGKILL at work."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._core import staging
from ansible_collections.vmimage.qemu.plugins.module_utils._core.fs import collect_temporaries, write_json_atomic
from ansible_collections.vmimage.qemu.plugins.module_utils._core.staging import WorkArea, remove_tree

COLLECTIONS = os.path.abspath(os.path.join(os.path.dirname(staging.__file__), *(['..'] * 6)))

_WORKER = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from ansible_collections.vmimage.qemu.plugins.module_utils._core.staging import WorkArea
    work = WorkArea(sys.argv[2], prefix=sys.argv[3]).new('job')
    with open(os.path.join(work.path, 'half'), 'wb') as f:
        f.write(b'x' * 4096)
    print(work.name, flush=True)
    time.sleep(60)
''')


def _worker(area):
    proc = subprocess.Popen([sys.executable, '-c', _WORKER, COLLECTIONS, area.path, area.prefix],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    name = proc.stdout.readline().decode().strip()
    assert name, 'the worker did not start'
    return proc, name


def test_commit_moves_the_folder_and_leaves_nothing_behind(tmp_path):
    area = WorkArea(str(tmp_path / 'area')).ensure()
    work = area.new('fetch')
    assert os.path.isdir(work.path) and os.path.exists(work.path + '.lock')
    with open(os.path.join(work.path, 'data'), 'w') as f:
        f.write('content')
    target = str(tmp_path / 'result')
    work.commit(target)
    assert open(os.path.join(target, 'data')).read() == 'content'
    assert os.listdir(area.path) == [] and not work.active
    work.discard()  # idempotent after a commit
    assert os.path.isdir(target)


def test_commit_refuses_an_existing_target(tmp_path):
    area = WorkArea(str(tmp_path / 'area')).ensure()
    target = tmp_path / 'result'
    target.mkdir()
    with area.new('x') as work:
        with pytest.raises(OSError) as info:
            work.commit(str(target))
        assert info.value.errno == errno.EEXIST
    assert os.listdir(area.path) == [], 'leaving the with block discards'


def test_commit_file_replaces_the_target_file(tmp_path):
    area = WorkArea(str(tmp_path), prefix='.w-')
    (tmp_path / 'out.bin').write_bytes(b'old')
    work = area.new('pack')
    with open(os.path.join(work.path, 'new'), 'wb') as f:
        f.write(b'new')
    work.commit_file('new', str(tmp_path / 'out.bin'))
    assert (tmp_path / 'out.bin').read_bytes() == b'new'
    assert sorted(os.listdir(str(tmp_path))) == ['out.bin']


def test_collect_spares_live_writers_and_removes_killed_ones(tmp_path):
    area = WorkArea(str(tmp_path / 'area')).ensure()
    alive, alive_name = _worker(area)
    victim, victim_name = _worker(area)
    try:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        names = set(os.listdir(area.path))
        assert {victim_name, victim_name + '.lock', alive_name, alive_name + '.lock'} <= names
        assert area.collect() == [victim_name]
        assert sorted(os.listdir(area.path)) == [alive_name, alive_name + '.lock']
    finally:
        alive.kill()
        alive.wait()
    assert area.collect() == [alive_name] and os.listdir(area.path) == []


def test_collect_removes_trash_and_folders_without_lock_only_with_its_prefix(tmp_path):
    area = WorkArea(str(tmp_path), prefix='.vmimage-work-')
    (tmp_path / 'user-file').write_text('mine')
    (tmp_path / '.vmimage-work-trash-1-aa').mkdir()
    (tmp_path / '.vmimage-work-job-1-bb').mkdir()     # its lock is gone: an owner removes the lock last
    (tmp_path / '.vmimage-work-job-2-cc.lock').write_text('')  # a lock whose folder was already removed
    (tmp_path / 'other-job-1-dd').mkdir()
    removed = area.collect()
    assert sorted(removed) == ['.vmimage-work-job-1-bb', '.vmimage-work-job-2-cc', '.vmimage-work-trash-1-aa']
    assert sorted(os.listdir(str(tmp_path))) == ['other-job-1-dd', 'user-file']


def test_trash_makes_a_read_only_tree_vanish(tmp_path):
    area = WorkArea(str(tmp_path / 'area')).ensure()
    victim = tmp_path / 'image'
    (victim / 'sub').mkdir(parents=True)
    (victim / 'sub' / 'f').write_text('x')
    os.chmod(str(victim / 'sub' / 'f'), 0o444)
    os.chmod(str(victim / 'sub'), 0o555)
    os.chmod(str(victim), 0o555)
    assert area.trash(str(victim)) is True
    assert not victim.exists() and os.listdir(area.path) == []
    assert area.trash(str(victim)) is False, 'a missing path is fine'


def test_a_trash_cut_short_is_collected(tmp_path, monkeypatch):
    area = WorkArea(str(tmp_path / 'area')).ensure()
    victim = tmp_path / 'image'
    victim.mkdir()
    (victim / 'f').write_text('x')
    monkeypatch.setattr(staging, 'remove_tree', lambda path: None)  # killed right after the rename
    area.trash(str(victim))
    monkeypatch.undo()
    assert not victim.exists() and len(os.listdir(area.path)) == 1
    assert len(area.collect()) == 1 and os.listdir(area.path) == []


def test_remove_tree_handles_files_and_missing_paths(tmp_path):
    f = tmp_path / 'f'
    f.write_text('x')
    remove_tree(str(f))
    remove_tree(str(tmp_path / 'missing'))
    assert os.listdir(str(tmp_path)) == []


_TEMP_WRITER = textwrap.dedent('''
    import fcntl, os, sys, time
    fd = os.open(os.path.join(sys.argv[1], '.tmp-live'), os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print('ready', flush=True)
    time.sleep(60)
''')


def test_dead_record_temporaries_are_collected_live_and_young_ones_are_not(tmp_path):
    folder = str(tmp_path)
    write_json_atomic(os.path.join(folder, 'record.json'), {'a': 1})
    assert os.listdir(folder) == ['record.json']
    dead = tmp_path / '.tmp-dead'
    dead.write_text('{"half')
    young = tmp_path / '.tmp-young'
    young.write_text('{"half')
    old = time.time() - 3600
    os.utime(str(dead), (old, old))
    writer = subprocess.Popen([sys.executable, '-c', _TEMP_WRITER, folder], stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline().strip() == b'ready'
        os.utime(os.path.join(folder, '.tmp-live'), (old, old))
        assert collect_temporaries(folder) == ['.tmp-dead']
        assert sorted(os.listdir(folder)) == ['.tmp-live', '.tmp-young', 'record.json']
    finally:
        writer.kill()
        writer.wait()
    assert collect_temporaries(folder) == ['.tmp-live'], 'its writer died'
