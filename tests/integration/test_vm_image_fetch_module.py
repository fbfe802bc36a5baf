"""vm_image_fetch and vm_image_info through ansible-playbook: idempotence,
check mode, diff, credentials never shown, errors with their kind."""

import io
import os

import pytest

from support.ansible_run import run_playbook
from support.http_server import LocalHTTPServer
from support.image_factory import make_image_folder, pattern

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive

SECRET = 's3cr3t-pw-xyz'


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('img')
    folder = make_image_folder(str(tmp / 'img'), disk_size=8 * 1024 * 1024,
                               chunks=[(0, pattern(4096, 1)), (5 * 1024 * 1024, pattern(100000, 2))],
                               machine={'version': 1, 'memory': 512})
    out = io.BytesIO()
    packed = write_image_archive(folder, out)
    with LocalHTTPServer() as srv:
        url = srv.add('/img/image.tar.zst', out.getvalue())
        auth_url = srv.add('/private/image.tar.zst', out.getvalue(), auth=('ci', SECRET))
        yield srv, url, auth_url, packed.digest


def _fetch(store, url, **kw):
    args = dict(url=url, store=store)
    args.update(kw)
    return {'vmimage.qemu.vm_image_fetch': args, 'register': 'r'}


def test_fetch_idempotent_check_mode_and_info(tmp_path, served):
    srv, url, _auth_url, digest = served
    store = str(tmp_path / 'store')
    check = run_playbook([_fetch(store, url, image_id='demo', checksum=digest)], tmp_path, check=True, diff=True)
    assert check[0]['changed'] is True and check[0]['downloaded'] is False
    assert not os.path.exists(store), 'check mode must not create the store'

    srv.clear_requests()
    run = run_playbook([
        _fetch(store, url, image_id='demo', checksum=digest),
        _fetch(store, url, image_id='demo', checksum=digest),
        {'vmimage.qemu.vm_image_info': {'store': store}},
        {'vmimage.qemu.vm_image_info': {'store': store, 'image': 'demo'}},
    ], tmp_path, diff=True)
    first, second, info, one = run.results
    assert first['changed'] is True and first['downloaded'] is True
    assert first['digest'] == digest and first['image_id'] == 'demo'
    assert first['disk'].endswith('/disk.img') and os.path.isfile(first['disk'])
    assert first['machine']['memory'] == 512 and first['virtual_size'] == 8 * 1024 * 1024
    assert first['source'] == url and 'diff' in first
    assert second['changed'] is False and second['downloaded'] is False
    assert len([r for r in srv.requests if r.method == 'GET']) == 1
    assert info['changed'] is False and info['usage']['images'] == 1
    assert info['images'][0]['aliases'] == ['demo'] and info['images'][0]['source'] == url
    assert one['images'][0]['digest'] == digest


def test_absent_removes_alias_and_image(tmp_path, served):
    _srv, url, _auth_url, digest = served
    store = str(tmp_path / 'store')
    run = run_playbook([
        _fetch(store, url, image_id='a'),
        {'vmimage.qemu.vm_image_fetch': {'image_id': 'a', 'state': 'absent', 'store': store}},
        {'vmimage.qemu.vm_image_fetch': {'image_id': 'a', 'state': 'absent', 'store': store}},
        {'vmimage.qemu.vm_image_info': {'store': store}},
    ], tmp_path)
    assert run[1]['changed'] is True and run[1]['removed_digest'] == digest
    assert run[2]['changed'] is False
    assert run[3]['usage']['images'] == 0


def test_credentials_never_shown(tmp_path, served):
    srv, _url, auth_url, digest = served
    store = str(tmp_path / 'store')
    run = run_playbook([_fetch(store, auth_url, url_username='ci', url_password=SECRET)], tmp_path)
    assert run[0]['digest'] == digest
    userinfo_url = auth_url.replace('http://', 'http://ci:%s@' % SECRET)
    bad = userinfo_url.replace('/private/', '/nothing/')
    run = run_playbook([
        _fetch(str(tmp_path / 'store2'), userinfo_url),
        _fetch(str(tmp_path / 'store3'), bad, retries=0),
    ], tmp_path, expect_failure=True)
    assert run[0]['changed'] is True and run[0]['image_id'] == 'url:' + auth_url
    assert run[1]['failed'] is True and run[1]['error_kind'] == 'download' and '404' in run[1]['msg']
    assert SECRET not in run.stdout and SECRET not in run.stderr


def test_checksum_mismatch_fails_with_kind(tmp_path, served):
    _srv, url, _auth_url, _digest = served
    store = str(tmp_path / 'store')
    run = run_playbook([_fetch(store, url, checksum='sha256:' + 'ab' * 32)], tmp_path, expect_failure=True)
    assert run[0]['failed'] is True and run[0]['error_kind'] == 'checksum_mismatch'
    assert 'expected sha256:' + 'ab' * 32 in run[0]['msg']
    assert os.listdir(os.path.join(store, 'images')) == []


MIRROR_SECRET = 'm1rr0r-pw-qrs'
TOKEN = 'tok3n-abc-789'
MIRROR_TOKEN = 'm1rr0r-tok3n-456'
NOT_SHOWN = 'VALUE_SPECIFIED_IN_NO_LOG_PARAMETER'


@pytest.fixture
def elsewhere(served):
    """A second origin (127.0.0.2) with a public mirror, a mirror with its own
    credentials and a checksum file; it records what each request carried."""
    srv, _url, _auth_url, digest = served
    data = _archive_bytes(srv)
    with LocalHTTPServer(host='127.0.0.2') as other:
        public = other.add('/public/image.tar.zst', data)
        private = other.add('/private/image.tar.zst', data, auth=('m', MIRROR_SECRET))
        sums = other.add('/SHA256SUMS', ('%s  image.tar.zst\n' % digest.split(':', 1)[1]).encode())
        yield other, public, private, sums


def _archive_bytes(srv):
    import urllib.request
    with urllib.request.urlopen(srv.url_for('/img/image.tar.zst')) as resp:
        return resp.read()


def _leaks(run, *secrets):
    return [s for s in secrets if s in run.stdout or s in run.stderr]


def _carried(request):
    return sorted(k for k in request.headers if k in ('authorization', 'x-api-token', 'private-token', 'x-trace'))


def test_credentials_stay_with_their_origin_and_never_show_at_vvv(tmp_path, served, elsewhere):
    srv, _url, auth_url, digest = served
    other, public, private, sums = elsewhere
    creds = dict(url_username='ci', url_password=SECRET, headers={'X-Api-Token': TOKEN, 'X-Trace': 'plain'})
    other.clear_requests()
    run = run_playbook([
        # A public mirror elsewhere and the checksum file elsewhere: neither gets the primary's credentials.
        _fetch(str(tmp_path / 's1'), auth_url, mirrors=[public], checksum='sha256:' + sums,
               force_basic_auth=True, **creds),
        # A mirror with credentials of its own gets exactly those.
        _fetch(str(tmp_path / 's2'), auth_url, checksum=digest, mirrors=[
            {'url': private, 'url_username': 'm', 'url_password': MIRROR_SECRET,
             'headers': {'Private-Token': MIRROR_TOKEN}}], **creds),
    ], tmp_path, verbosity=3)
    first, second = run.results
    assert first['downloaded'] and first['source'] == public and first['digest'] == digest
    assert second['downloaded'] and second['source'] == private
    seen = [(r.path, r.status, _carried(r)) for r in other.requests]
    assert seen == [('/SHA256SUMS', 200, []), ('/public/image.tar.zst', 200, []),
                    ('/private/image.tar.zst', 401, ['private-token']),
                    ('/private/image.tar.zst', 200, ['authorization', 'private-token'])]
    assert not _leaks(run, SECRET, MIRROR_SECRET, TOKEN, MIRROR_TOKEN)
    args = second['invocation']['module_args']
    assert args['headers'] == {'X-Api-Token': NOT_SHOWN, 'X-Trace': 'plain'}
    assert args['mirrors'][0]['url_password'] == NOT_SHOWN
    assert args['mirrors'][0]['headers'] == {'Private-Token': NOT_SHOWN}
    assert args['url_password'] == NOT_SHOWN and args['mirrors'][0]['url'] == private


def test_a_bearer_token_never_shows_at_v(tmp_path, served):
    srv, url, _auth_url, digest = served
    srv.clear_requests()
    token = 'Bearer ' + TOKEN
    run = run_playbook([
        _fetch(str(tmp_path / 's'), url, checksum=digest, headers={'Authorization': token}),
        _fetch(str(tmp_path / 's'), url.replace('/img/', '/nothing/'), retries=0,
               headers={'Authorization': token, 'X-Api-Key': MIRROR_TOKEN}),
    ], tmp_path, verbosity=1, expect_failure=True)
    ok, failed = run.results
    assert ok['downloaded'] and srv.requests[0].authorization == token
    assert failed['failed'] and failed['error_kind'] == 'download'
    assert ok['invocation']['module_args']['headers'] == {'Authorization': NOT_SHOWN}
    assert not _leaks(run, TOKEN, MIRROR_TOKEN)


def test_invalid_mirror_entry_is_an_invalid_option(tmp_path, served):
    _srv, url, _auth_url, _digest = served
    run = run_playbook([
        _fetch(str(tmp_path / 's'), url, mirrors=[
            'http://127.0.0.2:9/x', {'url': 'http://127.0.0.2:9/y', 'password': MIRROR_SECRET}]),
    ], tmp_path, verbosity=3, expect_failure=True)
    assert run[0]['failed'] and run[0]['error_kind'] == 'invalid_option'
    assert run[0]['msg'].startswith('mirrors[1] has unknown keys password')
    # Even a misspelt key is masked when its name says it holds a secret.
    assert not _leaks(run, MIRROR_SECRET)
