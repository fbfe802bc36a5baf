# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The modules' failures through ansible-playbook: each has ``error_kind`` and
a message that names the problem, whatever went wrong (a server that cannot
resume, a bad option value, a missing library, a full or read-only file
system, a store that does not exist)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import io
import os
import shutil
import subprocess

import pytest

from support.ansible_run import run_playbook, run_plays
from support.http_server import LocalHTTPServer
from support.image_factory import make_image_folder, pattern
from support.mounts import mounted_tmpfs

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._instance.instance import InstanceManager
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore

MIB = 1024 * 1024
needs_mount = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which('mount'), reason='mounting a tmpfs needs root')


def _archive(folder, data_bytes, disk_size, seed=1):
    make_image_folder(folder, disk_size=disk_size, chunks=[(0, pattern(data_bytes, seed))])
    out = io.BytesIO()
    return out, write_image_archive(folder, out).digest


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('img')
    small, small_digest = _archive(str(tmp / 'small'), 8192, MIB)
    big, big_digest = _archive(str(tmp / 'big'), 2 * MIB, 4 * MIB, seed=2)
    with LocalHTTPServer() as srv:
        yield {
            'srv': srv,
            'small': (srv.add('/small/image.tar.zst', small.getvalue()), small_digest),
            'big': (srv.add('/big/image.tar.zst', big.getvalue()), big_digest),
            'small_bytes': small.getvalue(),
        }


def _task(module, **args):
    return {'vmimage.qemu.' + module: args, 'ignore_errors': True}


def _failed(result, kind):
    assert result.get('failed') is True, result
    assert result.get('error_kind') == kind, result
    assert not result['msg'].startswith('Module failed'), result['msg']
    return result['msg']


def test_server_that_cannot_resume_ends_as_a_download_error(tmp_path, served):
    srv = served['srv']
    data = served['small_bytes']
    # Neither ETag nor Last-Modified, and every body cut in the middle: only
    # restarts from byte 0 are possible, and each is cut again.
    srv.add('/flaky/image.tar.zst', data, cut_after=len(data) // 2, cut_first=100, etag=False,
            last_modified=False)
    url = srv.url_for('/flaky/image.tar.zst', 'ci', 'pw-secret')
    store = str(tmp_path / 'store')
    run = run_playbook([_task('vm_image_fetch', url=url, image_id='flaky', store=store)], tmp_path,
                       expect_failure=True)
    msg = _failed(run[0], 'download')
    assert msg.startswith('download of %s failed: the server could not resume the interrupted transfer, and the '
                          'download was restarted from byte 0 3 times, the most allowed (last: could not resume '
                          % srv.url_for('/flaky/image.tar.zst'))
    assert 'pw-secret' not in run.stdout
    assert os.listdir(os.path.join(store, 'staging')) == [] and os.listdir(os.path.join(store, 'images')) == []


def test_invalid_checksum_values_are_option_errors(tmp_path, served):
    url, _digest = served['small']
    store = str(tmp_path / 'store')
    run = run_playbook([
        _task('vm_image_fetch', url=url, checksum='crc32:deadbeef', store=store),
        _task('vm_image_fetch', url=url, checksum='sha256:abc', store=store),
        _task('vm_image_fetch', url=url, checksum='ab' * 32, store=store),
    ], tmp_path, expect_failure=True)
    algorithm, length, malformed = [_failed(r, 'invalid_option') for r in run]
    for msg in (algorithm, length, malformed):
        assert msg.startswith('invalid checksum ') and 'Error' not in msg
        assert 'the checksum option takes <algorithm>:<hex digest> or <algorithm>:<URL of a checksum file>' in msg
    assert "unsupported checksum algorithm 'crc32'" in algorithm
    assert 'a sha256 digest has 64 hex digits, not 3' in length
    assert 'no algorithm' in malformed
    assert os.listdir(os.path.join(store, 'images')) == []
    assert served['srv'].requests_for('/small/image.tar.zst') == [], 'nothing is downloaded for a bad option'


def test_missing_requests_is_a_missing_library(tmp_path, served):
    # A real interpreter without requests: a virtualenv of the system Python
    # with nothing installed (Ansible's module wrapper needs only the stdlib).
    base = '/usr/bin/python3' if os.access('/usr/bin/python3', os.X_OK) else None
    if base is None:
        pytest.skip('needs /usr/bin/python3 to make a bare virtualenv')
    bare = str(tmp_path / 'bare')
    subprocess.run([base, '-m', 'venv', '--without-pip', bare], check=True)
    python = os.path.join(bare, 'bin', 'python')
    assert subprocess.run([python, '-c', 'import requests'], stderr=subprocess.DEVNULL, check=False).returncode
    url, _digest = served['small']
    store = str(tmp_path / 'store')
    run = run_playbook([_task('vm_image_fetch', url=url, image_id='small', store=store)], tmp_path,
                       extra_vars={'ansible_python_interpreter': python}, expect_failure=True)
    msg = _failed(run[0], 'missing_library')
    assert msg == ("the Python library 'requests' is required on the target host to download %s (Debian/Ubuntu: "
                   "apt install python3-requests, or pip install requests): No module named 'requests'" % url)


def test_info_on_a_host_without_a_store(tmp_path):
    store = str(tmp_path / 'nothing')
    run = run_playbook([_task('vm_image_info', store=store, image='builder'),
                        _task('vm_image_info', store=store)], tmp_path, expect_failure=True)
    msg = _failed(run[0], 'not_found')
    assert msg == "no image with image_id 'builder': store %s does not exist" % store
    assert run[0]['exists'] is False and run[0]['store'] == store
    assert run[1].get('failed') is not True and run[1]['images'] == [] and not os.path.exists(store)


@needs_mount
def test_full_and_read_only_file_systems(tmp_path, served):
    small_url, small_digest = served['small']
    big_url, big_digest = served['big']
    with mounted_tmpfs(str(tmp_path / 'full'), 'size=1m') as full, mounted_tmpfs(str(tmp_path / 'ro'), 'size=8m') as ro:
        full_store = os.path.join(full, 'store')
        ro_store = ImageStore(os.path.join(ro, 'store'))
        fetch_image(ro_store, small_url, alias='small', checksum=small_digest)
        InstanceManager(ro_store).ensure_present('vm', 'small')
        subprocess.run(['mount', '-o', 'remount,ro', ro], check=True)
        run = run_playbook([
            _task('vm_image_fetch', url=big_url, checksum=big_digest, image_id='big', store=full_store),
            _task('vm_image_info', store=full_store),
            _task('vm_image_fetch', url=big_url, checksum=big_digest, image_id='big', store=ro_store.root),
            _task('vm_image_instance', name='vm2', image='small', store=ro_store.root),
            _task('vm_image_instance', name='vm', state='absent', store=ro_store.root),
            _task('vm_image_info', store=ro_store.root),
        ], tmp_path, expect_failure=True)
        no_space, full_info, ro_fetch, ro_create, ro_remove, ro_info = run.results
        msg = _failed(no_space, 'no_space')
        assert msg.startswith('cannot extract %s into %s/staging/' % (big_url, full_store))
        assert msg.endswith('/image: no space left on device')
        assert full_info['usage']['images'] == 0 and full_info['usage']['aliases'] == 0
        assert os.listdir(os.path.join(full_store, 'staging')) == []
        assert _failed(ro_fetch, 'permission').startswith(
            'cannot fetch %s into store %s: read-only file system' % (big_url, ro_store.root))
        assert _failed(ro_create, 'permission').startswith(
            'cannot create or update instance vm2 in store %s: read-only file system' % ro_store.root)
        assert _failed(ro_remove, 'permission').startswith(
            'cannot remove instance vm from store %s: read-only file system' % ro_store.root)
        assert [i['name'] for i in ro_info['instances']] == ['vm'] and ro_info['usage']['images'] == 1


def test_recording_callback_keeps_handler_results_apart(tmp_path):
    # The tests read every task's result from the recording callback; a
    # handler's result must not overwrite the task before it.
    run = run_plays([{
        'hosts': 'localhost', 'connection': 'local', 'gather_facts': False,
        'vars': {'ansible_python_interpreter': '{{ ansible_playbook_python }}'},
        'tasks': [
            {'name': 'Notify', 'ansible.builtin.debug': {'msg': 'notifying'}, 'changed_when': True,
             'notify': 'Handle'},
            {'name': 'Last task', 'ansible.builtin.debug': {'msg': 'last task'}},
        ],
        'handlers': [{'name': 'Handle', 'ansible.builtin.debug': {'msg': 'handled'}}],
    }], tmp_path)
    assert run.names == ['Notify', 'Last task', 'Handle']
    assert [r['msg'] for r in run.results] == ['notifying', 'last task', 'handled']
