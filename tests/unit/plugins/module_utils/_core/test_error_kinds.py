# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Every failure the library hands a module has a kind and a message saying
what was being done where, and leaves the store as it was.

Real parts only: full and read-only file systems are tmpfs mounts (root;
skipped where mounting is not allowed), a store of another user is read by a
child process that drops to 'nobody', download faults come from the loopback
HTTP server."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import io
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

from support.http_server import LocalHTTPServer
from support.image_factory import make_image_folder, pattern
from support.mounts import mounted_tmpfs, remount_read_only

from ansible_collections.vmimage.qemu.plugins.module_utils._core import errors
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._transfer.checksum import resolve_checksum
from ansible_collections.vmimage.qemu.plugins.module_utils._transfer.download import DownloadRestartRequired, MAX_RESTARTS
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    DownloadError, InvalidOptionError, NoSpaceError, NotFoundError, PermissionDeniedError, StoreError,
    VmImageError,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._instance.instance import InstanceManager
from ansible_collections.vmimage.qemu.plugins.module_utils._modules.common import error_result
from ansible_collections.vmimage.qemu.plugins.module_utils._mutable.mutable_image import check_package_options
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore

MIB = 1024 * 1024
IS_ROOT = os.geteuid() == 0
needs_mount = pytest.mark.skipif(not IS_ROOT or not shutil.which('mount'), reason='mounting a tmpfs needs root')


@pytest.fixture
def server():
    with LocalHTTPServer() as srv:
        yield srv


def _archive(tmp_path, name, data_bytes=8192, disk_size=MIB, seed=1):
    """(archive bytes, digest) of an image with ``data_bytes`` of poorly
    compressible data in its disk."""
    folder = make_image_folder(str(tmp_path / name), disk_size=disk_size,
                               chunks=[(0, pattern(data_bytes, seed))])
    out = io.BytesIO()
    result = write_image_archive(folder, out)
    return out.getvalue(), result.digest


def _fill(folder):
    """Take every free block of the file system of ``folder``; return the file."""
    path = os.path.join(folder, 'filler')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b'\xff' * 65536
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return path


def _free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _state(store):
    """What a failed task must leave as it was: every entry of the store's
    images, aliases, staging and instances folders (lock files aside)."""
    state = {}
    for folder in (store.images_dir, store.aliases_dir, store.staging_dir, store.instances_dir):
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            state[dirpath] = sorted(filenames)
    return state


def _only_kind_and_message(exc):
    result = error_result(exc)
    assert set(result) == {'msg', 'error_kind'}, result
    assert 'Error' not in result['msg'] and 'Errno' not in result['msg'], result['msg']
    return result['error_kind'], result['msg']


# ---------------------------------------------------------------- the classifier

@pytest.mark.parametrize('code, cls, kind, words', [
    (errno.ENOSPC, NoSpaceError, 'no_space', 'no space left on device'),
    (errno.EDQUOT, NoSpaceError, 'no_space', 'disk quota exceeded'),
    (errno.EACCES, PermissionDeniedError, 'permission', 'permission denied'),
    (errno.EPERM, PermissionDeniedError, 'permission', 'operation not permitted'),
    (errno.EROFS, PermissionDeniedError, 'permission', 'read-only file system'),
    (errno.EIO, StoreError, 'store', os.strerror(errno.EIO)),
])
def test_os_errors_get_a_kind_the_action_and_both_paths(code, cls, kind, words):
    exc = OSError(code, os.strerror(code), '/srv/store/staging/1-ab/image/disk.img')
    error = errors.os_error(exc, 'extract http://h/image.tar.zst into', '/srv/store/staging/1-ab/image', StoreError)
    assert isinstance(error, cls) and error.kind == kind and error.errno == code
    assert str(error) == ('cannot extract http://h/image.tar.zst into /srv/store/staging/1-ab/image: %s '
                          '(/srv/store/staging/1-ab/image/disk.img)' % words)
    # The path is not repeated when the system call named the same one.
    same = errors.os_error(OSError(code, os.strerror(code), '/srv/x'), 'create', '/srv/x', StoreError)
    assert str(same) == 'cannot create /srv/x: %s' % words


def test_os_errors_context_leaves_other_errors_alone():
    with pytest.raises(NoSpaceError):
        with errors.os_errors('write', '/x'):
            raise OSError(errno.ENOSPC, 'No space left on device')
    # No errno: not a file system error (some network exceptions are OSErrors).
    with pytest.raises(OSError) as info:
        with errors.os_errors('write', '/x'):
            raise OSError('connection reset')
    assert not isinstance(info.value, VmImageError)
    with pytest.raises(NotFoundError):
        with errors.os_errors('write', '/x'):
            raise NotFoundError('gone')


def test_error_result_classifies_a_stray_os_error_and_marks_bugs_internal():
    stray = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/srv/store/aliases/x.json')
    assert _only_kind_and_message(stray) == (
        'no_space', 'cannot complete the task: no space left on device (/srv/store/aliases/x.json)')
    result = None
    try:
        {}['missing']
    except KeyError as exc:
        result = error_result(exc)
    assert result['error_kind'] == 'internal' and result['msg'] == "KeyError: 'missing'"
    assert 'Traceback' in result['exception']


# ---------------------------------------------------------------- options

@pytest.mark.parametrize('checksum, words', [
    ('crc32:deadbeef', "unsupported checksum algorithm 'crc32'"),
    ('sha256:abc', 'a sha256 digest has 64 hex digits, not 3'),
    ('0f343b0931126a20f133d67c2b018a3b7b9f8f7e2c6a1d6b0d6e1c4e8f9a7b2c', 'no algorithm'),
])
def test_invalid_checksum_is_an_option_error(tmp_path, checksum, words):
    store = ImageStore(str(tmp_path / 'store'))
    with pytest.raises(InvalidOptionError) as info:
        fetch_image(store, 'http://127.0.0.1:9/image.tar.zst', checksum=checksum, alias='x')
    kind, msg = _only_kind_and_message(info.value)
    assert kind == 'invalid_option' and msg.startswith('invalid checksum ') and words in msg
    assert '<algorithm>:<hex digest> or <algorithm>:<URL of a checksum file>' in msg and 'sha512' in msg
    assert isinstance(info.value, ValueError), 'callers that caught ValueError still do'


@pytest.mark.parametrize('options, words', [
    (dict(state='present', compression_level=40), 'compression_level must be between 1 and 19, got 40'),
    (dict(state='present', max_size_gib=0), 'max_size_gib must be a whole number of GiB, at least 1, got 0'),
    (dict(state='absent', dest='/srv/out.tar.zst'), 'dest is only used with state=present'),
])
def test_package_option_checks_are_option_errors(options, words):
    with pytest.raises(InvalidOptionError) as info:
        check_package_options(**options)
    kind, msg = _only_kind_and_message(info.value)
    assert kind == 'invalid_option' and msg.startswith(words)
    check_package_options('present', dest='/srv/out.tar.zst', compression_level=19, max_size_gib=1)


def test_image_of_a_store_that_does_not_exist_is_not_found(tmp_path):
    store = ImageStore(str(tmp_path / 'nothing'), create=False)
    for ref, shown in (('builder', "with image_id 'builder'"), ('sha256:' + '0' * 64, 'sha256:' + '0' * 64)):
        with pytest.raises(NotFoundError) as info:
            store.resolve(ref)
        assert _only_kind_and_message(info.value) == (
            'not_found', 'no image %s: store %s does not exist' % (shown, store.root))
    assert not os.path.exists(store.root)


# ---------------------------------------------------------------- downloads

def test_exhausted_restarts_are_a_download_error(tmp_path, server):
    data, digest = _archive(tmp_path, 'img', data_bytes=300000)
    # No validator and every body cut short: the download can only restart
    # from byte 0, and every restart is cut again.
    server.add('/image.tar.zst', data, cut_after=len(data) // 2, cut_first=100, etag=False, last_modified=False)
    url = server.url_for('/image.tar.zst', 'ci', 'pw-secret')
    store = ImageStore(str(tmp_path / 'store'))
    before = _state(store)
    with pytest.raises(DownloadError) as info:
        fetch_image(store, url, alias='x', checksum=digest, sleep=lambda seconds: None)
    assert not isinstance(info.value, DownloadRestartRequired)
    kind, msg = _only_kind_and_message(info.value)
    assert kind == 'download' and 'pw-secret' not in msg
    assert msg.startswith('download of %s failed: the server could not resume the interrupted transfer, and the '
                          'download was restarted from byte 0 %d times, the most allowed (last: could not resume '
                          'at byte ' % (server.url_for('/image.tar.zst'), MAX_RESTARTS))
    assert msg.endswith('the server gave no validator (ETag, Last-Modified) to resume safely)')
    gets = [r for r in server.requests_for('/image.tar.zst') if r.method == 'GET']
    assert len(gets) == MAX_RESTARTS + 2, 'the first transfer, then one per restart and the one given up'
    assert _state(store) == before and store.aliases() == {}


def test_exhausted_restarts_of_a_checksum_file_are_a_download_error(server):
    sums = ('%s  image.tar.zst\n' % ('ab' * 32)).encode('ascii') * 20
    url = server.add('/SHA256SUMS', sums, cut_after=100, cut_first=100, etag=False, last_modified=False)
    with pytest.raises(DownloadError) as info:
        resolve_checksum('sha256:' + url, 'http://h/image.tar.zst', sleep=lambda seconds: None)
    kind, msg = _only_kind_and_message(info.value)
    assert kind == 'download' and msg.startswith('download of %s failed: the server could not resume' % url)


# ---------------------------------------------------------------- full file system

@needs_mount
def test_full_file_system_fails_the_fetch_with_no_space_and_keeps_nothing(tmp_path, server):
    data, digest = _archive(tmp_path, 'big', data_bytes=2 * MIB, disk_size=4 * MIB)
    url = server.add('/big/image.tar.zst', data)
    with mounted_tmpfs(str(tmp_path / 'small'), 'size=1m') as root:
        store = ImageStore(os.path.join(root, 'store'))
        before, free = _state(store), _free_bytes(root)
        with pytest.raises(NoSpaceError) as info:
            fetch_image(store, url, alias='big', checksum=digest)
        kind, msg = _only_kind_and_message(info.value)
        assert kind == 'no_space'
        assert msg.startswith('cannot extract %s into %s/' % (url, store.staging_dir))
        assert msg.endswith('/image: no space left on device')
        assert _state(store) == before, 'staging removed, no image, no alias'
        assert os.listdir(store.staging_dir) == [] and os.listdir(store.images_dir) == []
        assert _free_bytes(root) == free, 'every block the fetch wrote is free again'


@needs_mount
def test_full_file_system_fails_instance_creation_and_keeps_nothing(tmp_path, server):
    data, digest = _archive(tmp_path, 'small')
    url = server.add('/small/image.tar.zst', data)
    with mounted_tmpfs(str(tmp_path / 'fs'), 'size=4m') as root:
        store = ImageStore(os.path.join(root, 'store'))
        fetch_image(store, url, alias='small', checksum=digest)
        manager = InstanceManager(store)
        filler = _fill(root)
        before = _state(store)
        with pytest.raises(NoSpaceError) as info:
            manager.ensure_present('vm', 'small')
        kind, msg = _only_kind_and_message(info.value)
        assert kind == 'no_space'
        assert msg.startswith('cannot create the disk of instance vm in %s: qemu-img create ' % store.instances_dir)
        assert 'No space left on device' in msg
        assert _state(store) == before and store.users(digest) == [], 'no instance, no work folder, no reference'
        os.unlink(filler)
        assert manager.ensure_present('vm', 'small').action == 'create'


# ---------------------------------------------------------------- read-only store

@needs_mount
def test_read_only_store_fails_every_change_with_permission(tmp_path, server):
    one, one_digest = _archive(tmp_path, 'one', seed=1)
    two, two_digest = _archive(tmp_path, 'two', seed=2)
    url_one = server.add('/one/image.tar.zst', one)
    url_two = server.add('/two/image.tar.zst', two)
    with mounted_tmpfs(str(tmp_path / 'fs'), 'size=8m') as root:
        store = ImageStore(os.path.join(root, 'store'))
        fetch_image(store, url_one, alias='one', checksum=one_digest)
        manager = InstanceManager(store)
        manager.ensure_present('vm', 'one')
        remount_read_only(root)
        before = _state(store)
        changes = [
            (lambda: fetch_image(store, url_two, alias='two', checksum=two_digest),
             'cannot fetch %s into store %s: read-only file system (%s/' % (url_two, store.root, store.locks_dir)),
            (lambda: store.remove_alias('one'),
             "cannot remove image_id 'one' from store %s: read-only file system (%s/.lock)"
             % (store.root, store.root)),
            # Instance operations take the instance's own lock first.
            (lambda: manager.ensure_present('vm2', 'one'),
             'cannot create or update instance vm2 in store %s: read-only file system (%s/'
             % (store.root, store.locks_dir)),
            (lambda: manager.remove('vm'),
             'cannot remove instance vm from store %s: read-only file system (%s/' % (store.root, store.locks_dir)),
            (lambda: ImageStore(os.path.join(root, 'other')),
             'cannot create store %s: read-only file system' % os.path.join(root, 'other')),
        ]
        for change, start in changes:
            with pytest.raises(PermissionDeniedError) as info:
                change()
            kind, msg = _only_kind_and_message(info.value)
            assert kind == 'permission' and msg.startswith(start), msg
        assert _state(store) == before
        # Reading a read-only store works.
        assert store.resolve('one') == one_digest and [r['name'] for r in manager.list()] == ['vm']


# ---------------------------------------------------------------- another user's store

try:
    NOBODY = pwd.getpwnam('nobody')
except KeyError:
    NOBODY = None
# The child runs the library as 'nobody', under an interpreter it may use
# (the test interpreter can live in a folder nobody cannot enter).
CHILD_PYTHON = '/usr/bin/python3' if os.access('/usr/bin/python3', os.X_OK) else sys.executable
COLLECTION_ROOT = errors.__file__.partition(os.sep + 'ansible_collections' + os.sep)[0]

_CHILD = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
from ansible_collections.vmimage.qemu.plugins.module_utils._instance.instance import InstanceManager
from ansible_collections.vmimage.qemu.plugins.module_utils._modules.common import error_result
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore

root, url, fresh = sys.argv[2:5]


def report():
    store = ImageStore(root, create=False)
    return [store.aliases(), list(store.iter_records())]


steps = [
    ('report', report),
    ('resolve', lambda: ImageStore(root, create=False).resolve('one')),
    ('fetch', lambda: fetch_image(ImageStore(root), url, alias='two')),
    ('new store', lambda: fetch_image(ImageStore(fresh), url, alias='two')),
    ('instance', lambda: InstanceManager(ImageStore(root, create=False)).ensure_present('vm2', 'one')),
    ('remove', lambda: InstanceManager(ImageStore(root, create=False)).remove('vm')),
]
results = {}
for name, step in steps:
    try:
        step()
        results[name] = None
    except Exception as exc:
        results[name] = error_result(exc)
print(json.dumps(results))
'''


def _drop_to_nobody():
    os.setgroups([])
    os.setgid(NOBODY.pw_gid)
    os.setuid(NOBODY.pw_uid)


@pytest.fixture
def shared_folder():
    """A root-owned folder everyone may enter (pytest's own tmp is 0700)."""
    path = tempfile.mkdtemp(prefix='vmimage-perm-')
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(not IS_ROOT or NOBODY is None, reason='needs root and a nobody user to drop privileges')
def test_store_of_another_user_fails_with_permission_not_an_empty_answer(tmp_path, server, shared_folder):
    probe = subprocess.run([CHILD_PYTHON, '-c', 'import sys; sys.path.insert(0, sys.argv[1]); '
                            'import ansible_collections.vmimage.qemu.plugins.module_utils._store.store', COLLECTION_ROOT],
                           preexec_fn=_drop_to_nobody, cwd='/', stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           check=False)
    if probe.returncode != 0:
        pytest.skip('nobody cannot import the collection here: %s' % probe.stderr.decode()[-300:])
    data, digest = _archive(tmp_path, 'one')
    url = server.add('/one/image.tar.zst', data)
    store = ImageStore(os.path.join(shared_folder, 'store'))  # root's, mode 0700
    fetch_image(store, url, alias='one', checksum=digest)
    InstanceManager(store).ensure_present('vm', 'one')
    before = _state(store)
    fresh = os.path.join(shared_folder, 'fresh')

    proc = subprocess.run([CHILD_PYTHON, '-c', _CHILD, COLLECTION_ROOT, store.root, url, fresh],
                          preexec_fn=_drop_to_nobody, cwd='/', stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    expected = {
        'report': 'cannot list the image names (aliases) in %s: permission denied' % store.aliases_dir,
        'resolve': 'cannot read %s/' % store.aliases_dir,
        'fetch': 'cannot create %s: permission denied' % store.images_dir,
        'new store': 'cannot create store %s: permission denied' % fresh,
        'instance': 'cannot read %s/' % store.aliases_dir,
        'remove': 'cannot read %s: permission denied' % os.path.join(store.instances_dir, 'vm', 'instance.json'),
    }
    for name, start in sorted(expected.items()):
        result = results[name]
        assert result is not None, '%s as nobody succeeded' % name
        assert result['error_kind'] == 'permission' and result['msg'].startswith(start), (name, result)
        assert result['msg'].endswith('permission denied'), (name, result)
    assert _state(store) == before and not os.path.exists(fresh)
