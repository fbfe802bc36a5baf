# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The image store against a real loopback HTTP server: one-pass fetch,
idempotence without network, checksums, resume/restart, concurrency across
real processes, crash debris, removal rules."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from support.http_server import LocalHTTPServer
from support.image_factory import make_image_folder, pattern

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    ChecksumMismatchError, DownloadError, ImageInUseError, NotFoundError, UnsafeImageError, InvalidArchiveError,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore, write_json_atomic

COLLECTIONS = os.environ.get('ANSIBLE_COLLECTIONS_PATH', '')


def _archive(tmp_path, name='img', disk_size=4 * 1024 * 1024, seed=1, machine=None):
    folder = make_image_folder(str(tmp_path / name), disk_size=disk_size,
                               chunks=[(0, pattern(8192, seed)), (disk_size // 2, pattern(300000, seed + 1))],
                               machine=machine)
    out = io.BytesIO()
    result = write_image_archive(folder, out)
    return out.getvalue(), result.digest


@pytest.fixture
def server():
    with LocalHTTPServer() as srv:
        yield srv


def _bodies(srv, path):
    return [r for r in srv.requests_for(path) if r.method == 'GET' and r.status in (200, 206)]


def _store_is_clean(store):
    """No staging debris and nothing in images/ but complete images."""
    staging = os.listdir(store.staging_dir)
    assert staging == [], staging
    for name in os.listdir(store.images_dir):
        assert sorted(os.listdir(os.path.join(store.images_dir, name))) == \
            ['disk.img', 'image.json', 'layer.qcow2', 'machine.json']


def test_fetch_commits_validated_image_and_second_run_is_offline(tmp_path, server):
    data, digest = _archive(tmp_path)
    url = server.add('/a/image.tar.zst', data)
    store = ImageStore(str(tmp_path / 'store'))
    first = fetch_image(store, url, alias='builder')
    assert first.changed and first.downloaded
    assert first.digest == digest
    path = store.image_path(digest)
    assert oct(os.stat(path).st_mode & 0o777) == '0o555'
    for name in ('disk.img', 'layer.qcow2', 'machine.json'):
        assert os.stat(os.path.join(path, name)).st_mode & 0o222 == 0, 'cached files must be read-only'
    record = store.get_record(digest)
    assert record['source'] == url
    assert record['virtual_size'] == 4 * 1024 * 1024
    assert record['validator_version'] >= 1
    assert record['allocated_size'] < record['apparent_size']
    assert oct(os.stat(store.root).st_mode & 0o777) == '0o700'

    server.clear_requests()
    again = fetch_image(store, url, alias='builder')
    assert not again.changed and not again.downloaded and again.digest == digest
    assert server.requests == [], 'an image that is present must cost no network I/O'
    _store_is_clean(store)


def test_persistent_across_store_objects_and_digest_shortcut(tmp_path, server):
    data, digest = _archive(tmp_path)
    url = server.add('/image.tar.zst', data)
    fetch_image(ImageStore(str(tmp_path / 'store')), url, alias='one')
    server.clear_requests()
    store = ImageStore(str(tmp_path / 'store'))  # a new process would see the same
    result = fetch_image(store, 'http://127.0.0.1:9/never-used', alias='two', checksum=digest)
    assert result.changed and not result.downloaded and result.digest == digest
    assert server.requests == []
    assert sorted(store.aliases()) == ['one', 'two']
    assert store.usage()['images'] == 1


def test_checksum_mismatch_leaves_nothing(tmp_path, server):
    data, digest = _archive(tmp_path)
    url = server.add('/image.tar.zst', data)
    store = ImageStore(str(tmp_path / 'store'))
    with pytest.raises(ChecksumMismatchError) as err:
        fetch_image(store, url, alias='x', checksum='sha256:' + '0' * 64)
    assert 'expected sha256:' + '0' * 64 in str(err.value)
    assert os.listdir(store.images_dir) == [] and store.aliases() == {}
    _store_is_clean(store)


def test_checksum_file_url_and_sha512(tmp_path, server):
    import hashlib
    data, digest = _archive(tmp_path)
    url = server.add('/rel/image.tar.zst', data)
    sums = '%s  image.tar.zst\n%s  other.tar.zst\n' % (hashlib.sha512(data).hexdigest(), 'ab' * 64)
    sums_url = server.add('/rel/SHA512SUMS', sums.encode())
    store = ImageStore(str(tmp_path / 'store'))
    result = fetch_image(store, url, alias='x', checksum='sha512:' + sums_url)
    assert result.digest == digest
    assert store.get_record(digest)['digests']['sha512'] == hashlib.sha512(data).hexdigest()
    # A sha512 hex digest finds the stored image without downloading.
    server.clear_requests()
    again = fetch_image(store, url, alias='y', checksum='sha512:' + hashlib.sha512(data).hexdigest())
    assert not again.downloaded and again.digest == digest and server.requests == []


def test_resume_after_cut_fetches_only_the_rest(tmp_path, server):
    data, digest = _archive(tmp_path, disk_size=16 * 1024 * 1024)
    cut = len(data) // 2
    url = server.add('/image.tar.zst', data, cut_after=cut)
    store = ImageStore(str(tmp_path / 'store'))
    result = fetch_image(store, url, alias='x', sleep=lambda s: None)
    assert result.digest == digest and result.resumed == 1
    bodies = _bodies(server, '/image.tar.zst')
    assert [b.status for b in bodies] == [200, 206]
    assert bodies[1].range == 'bytes=%d-' % cut
    assert sum(b.sent for b in bodies) == len(data), 'resume must not fetch everything again'


def test_restart_when_server_ignores_range(tmp_path, server):
    data, digest = _archive(tmp_path, disk_size=16 * 1024 * 1024)
    url = server.add('/image.tar.zst', data, cut_after=len(data) // 3, no_range=True)
    store = ImageStore(str(tmp_path / 'store'))
    result = fetch_image(store, url, alias='x', sleep=lambda s: None)
    assert result.digest == digest and result.restarts == 1
    _store_is_clean(store)


def test_http_errors_leave_store_as_it_was(tmp_path, server):
    url = server.add('/missing.tar.zst', b'', status=404)
    store = ImageStore(str(tmp_path / 'store'))
    with pytest.raises(DownloadError) as err:
        fetch_image(store, url, alias='x', sleep=lambda s: None)
    assert '404' in str(err.value) and '/missing.tar.zst' in str(err.value)
    assert store.aliases() == {}
    _store_is_clean(store)


def test_invalid_image_is_rejected_and_nothing_kept(tmp_path, server):
    # A layer whose backing file points at a host file.
    folder = make_image_folder(str(tmp_path / 'bad'), disk_size=1024 * 1024)
    os.unlink(os.path.join(folder, 'layer.qcow2'))
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', '/etc/passwd', '-u',
                    'layer.qcow2', '1M'], cwd=folder, check=True)
    out = io.BytesIO()
    write_image_archive(folder, out)
    url = server.add('/bad.tar.zst', out.getvalue())
    store = ImageStore(str(tmp_path / 'store'))
    with pytest.raises(UnsafeImageError) as err:
        fetch_image(store, url, alias='bad')
    assert '/etc/passwd' in str(err.value)
    assert os.listdir(store.images_dir) == [] and store.aliases() == {}
    _store_is_clean(store)


def test_garbage_is_rejected(tmp_path, server):
    url = server.add('/junk.tar.zst', os.urandom(100000))
    store = ImageStore(str(tmp_path / 'store'))
    with pytest.raises(InvalidArchiveError):
        fetch_image(store, url, alias='junk')
    _store_is_clean(store)


def test_alias_follows_url_change_and_force(tmp_path, server):
    data1, digest1 = _archive(tmp_path, 'one', seed=1)
    data2, digest2 = _archive(tmp_path, 'two', seed=7)
    url1 = server.add('/v1.tar.zst', data1)
    url2 = server.add('/v2.tar.zst', data2)
    store = ImageStore(str(tmp_path / 'store'))
    assert fetch_image(store, url1, alias='builder').digest == digest1
    moved = fetch_image(store, url2, alias='builder')
    assert moved.changed and moved.digest == digest2 and moved.previous_digest == digest1
    assert store.resolve('builder') == digest2
    # force re-downloads; same content means nothing changed in the store.
    server.clear_requests()
    forced = fetch_image(store, url2, alias='builder', force=True)
    assert forced.downloaded and not forced.changed and len(_bodies(server, '/v2.tar.zst')) == 1


def test_check_mode_does_nothing(tmp_path, server):
    data, digest = _archive(tmp_path)
    url = server.add('/image.tar.zst', data)
    store = ImageStore(str(tmp_path / 'store'))
    result = fetch_image(store, url, alias='x', check_mode=True)
    assert result.changed and not result.downloaded
    assert server.requests == [] and store.aliases() == {}


def test_remove_alias_rules(tmp_path, server):
    data, digest = _archive(tmp_path)
    url = server.add('/image.tar.zst', data)
    store = ImageStore(str(tmp_path / 'store'))
    fetch_image(store, url, alias='a')
    fetch_image(store, url, alias='b')
    assert store.remove_alias('a') == (True, None)  # 'b' still names the image
    assert os.path.isdir(store.image_path(digest))
    # An instance (its record and its reference, as InstanceManager makes
    # them) keeps the image alive.
    inst = os.path.join(store.instances_dir, 'vm1')
    os.mkdir(inst)
    write_json_atomic(os.path.join(inst, 'instance.json'), {'name': 'vm1', 'digest': digest})
    with store.lock():
        store.refs.add(digest, 'instance', 'vm1')
    for check_mode in (True, False):
        with pytest.raises(ImageInUseError) as err:
            store.remove_alias('b', check_mode=check_mode)
        assert 'instance vm1' in str(err.value)
    assert store.resolve('b') == digest
    # The instance goes but its reference stays behind (a process killed
    # between the two): the reference no longer blocks anything.
    os.unlink(os.path.join(inst, 'instance.json'))
    os.rmdir(inst)
    assert [(r.kind, r.key) for r in store.refs.of(digest)] == [('alias', 'b'), ('instance', 'vm1')]
    assert store.users(digest) == [], 'a reference whose holder is gone does not count'
    assert store.remove_alias('b', check_mode=True) == (True, digest)
    assert store.resolve('b') == digest
    assert store.remove_alias('b') == (True, digest)
    assert not os.path.exists(store.image_path(digest))
    assert store.refs.of(digest) == [] and store.refs.digests() == [], 'the image took its records along'
    assert store.remove_alias('b') == (False, None)
    with pytest.raises(NotFoundError):
        store.resolve('b')
    _store_is_clean(store)


_FETCH_SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
    from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore
    r = fetch_image(ImageStore(sys.argv[2]), sys.argv[3], alias=sys.argv[4])
    print(json.dumps({"digest": r.digest, "downloaded": r.downloaded}))
''')


def _spawn_fetch(store_root, url, alias):
    return subprocess.Popen([sys.executable, '-c', _FETCH_SCRIPT, COLLECTIONS, store_root, url, alias],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_eight_processes_one_download(tmp_path, server):
    data, digest = _archive(tmp_path, disk_size=8 * 1024 * 1024)
    # Slow enough that all eight are waiting while the first downloads.
    url = server.add('/image.tar.zst', data, slow=max(len(data) * 2, 1))
    root = str(tmp_path / 'store')
    ImageStore(root)
    procs = [_spawn_fetch(root, url, 'shared') for _i in range(8)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        results.append(json.loads(out))
    assert {r['digest'] for r in results} == {digest}
    assert sum(r['downloaded'] for r in results) == 1
    assert len(_bodies(server, '/image.tar.zst')) == 1, 'the server must see exactly one body transfer'
    _store_is_clean(ImageStore(root))


def test_different_images_download_in_parallel(tmp_path, server):
    data1, d1 = _archive(tmp_path, 'one', seed=1)
    data2, d2 = _archive(tmp_path, 'two', seed=5)
    rate = max(len(data1), len(data2))  # about 1 s each
    url1 = server.add('/one.tar.zst', data1, slow=rate)
    url2 = server.add('/two.tar.zst', data2, slow=rate)
    root = str(tmp_path / 'store')
    ImageStore(root)
    start = time.monotonic()
    procs = [_spawn_fetch(root, url1, 'one'), _spawn_fetch(root, url2, 'two')]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    elapsed = time.monotonic() - start
    assert elapsed < 1.8 + 1.5, 'two different images should not wait for each other (%.1f s)' % elapsed
    assert ImageStore(root).usage()['images'] == 2


def test_sigkill_mid_fetch_does_not_block_or_poison_the_next(tmp_path, server):
    data, digest = _archive(tmp_path, disk_size=8 * 1024 * 1024)
    url = server.add('/image.tar.zst', data, slow=max(len(data) // 10, 1), slow_first=1)
    root = str(tmp_path / 'store')
    store = ImageStore(root)
    victim = _spawn_fetch(root, url, 'x')
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(name.endswith('.lock') for name in os.listdir(store.staging_dir)) and \
                any(os.path.isdir(os.path.join(store.staging_dir, n)) for n in os.listdir(store.staging_dir)):
            break
        time.sleep(0.05)
    time.sleep(0.5)  # let it write part of the image
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert os.listdir(store.staging_dir), 'the killed fetch should have left debris to clean'
    assert os.listdir(store.images_dir) == [], 'a half image must never be visible'
    start = time.monotonic()
    result = fetch_image(store, url, alias='x')
    assert result.digest == digest and result.downloaded
    assert time.monotonic() - start < 20, 'the dead fetch must not block the next one'
    _store_is_clean(store)


def test_derived_names_only(tmp_path, server):
    data, digest = _archive(tmp_path)
    url = server.add('/image.tar.zst', data)
    store = ImageStore(str(tmp_path / 'store'))
    fetch_image(store, url, alias='../../etc/evil')
    fetch_image(store, url, alias='/absolute')
    for name in os.listdir(store.aliases_dir):
        assert len(name) == 64 + 5 and name.endswith('.json')
    assert sorted(store.aliases()) == ['../../etc/evil', '/absolute']
    assert not os.path.exists(str(tmp_path / 'etc'))


def test_stray_files_in_instances_do_not_break_the_store(tmp_path, server):
    data, digest = _archive(tmp_path)
    store = ImageStore(str(tmp_path / 'store'))
    fetch_image(store, server.add('/image.tar.zst', data), alias='a')
    with open(os.path.join(store.instances_dir, 'stray-file'), 'w') as f:
        f.write('x')
    assert store.users(digest) == []
    assert store.remove_alias('a') == (True, digest)


def test_remove_by_digest_takes_every_name_and_respects_users(tmp_path, server):
    data, digest = _archive(tmp_path)
    url = server.add('/image.tar.zst', data)
    store = ImageStore(str(tmp_path / 'store'))
    fetch_image(store, url, alias='a')
    fetch_image(store, url, alias='b')
    with store.lock():
        store.refs.add(digest, 'instance', 'vm1')
    inst = os.path.join(store.instances_dir, 'vm1')
    os.mkdir(inst)
    write_json_atomic(os.path.join(inst, 'instance.json'), {'name': 'vm1', 'digest': digest})
    with pytest.raises(ImageInUseError, match='instance vm1'):
        store.remove_image(digest)
    os.unlink(os.path.join(inst, 'instance.json'))
    os.rmdir(inst)
    assert store.remove_image(digest, check_mode=True) == (True, ['a', 'b'])
    assert store.resolve('a') == digest, 'check mode removes nothing'
    assert store.remove_image(digest) == (True, ['a', 'b'])
    assert store.aliases() == {} and list(store.iter_records()) == [] and store.refs.digests() == []
    assert store.remove_image(digest) == (False, [])
    _store_is_clean(store)
