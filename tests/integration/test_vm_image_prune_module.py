"""vm_image_prune through ansible-playbook: nightly rotation with an
instance on the middle release, check mode equal to the real run, diff, a
second run that changes nothing, option errors with their kind, and the
image_cache role's prune setting."""

import io
import os
import subprocess

import pytest

from support.ansible_run import run_playbook
from support.http_server import LocalHTTPServer
from support.image_factory import make_image_folder, pattern

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive


@pytest.fixture(scope='module')
def releases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('releases')
    with LocalHTTPServer() as srv:
        found = []
        for n in (1, 2, 3):
            folder = make_image_folder(str(tmp / ('r%d' % n)), disk_size=4 * 1024 * 1024,
                                       chunks=[(0, pattern(65536, n)), (2 * 1024 * 1024, pattern(300000, n + 10))])
            out = io.BytesIO()
            packed = write_image_archive(folder, out)
            found.append((srv.add('/nightly/%d/image.tar.zst' % n, out.getvalue()), packed.digest))
        yield found


def _du(path):
    return int(subprocess.run(['du', '-s', '-B1', path], stdout=subprocess.PIPE, check=True).stdout.split()[0])


def _fetch(store, url):
    return {'vmimage.qemu.vm_image_fetch': dict(url=url, image_id='nightly', store=store)}


def _prune(store, **kw):
    return {'vmimage.qemu.vm_image_prune': dict(store=store, min_age=0, **kw)}


def test_nightly_rotation(tmp_path, releases):
    (url1, d1), (url2, d2), (url3, d3) = releases
    store = str(tmp_path / 'store')
    run_playbook([
        _fetch(store, url1), _fetch(store, url2),
        {'vmimage.qemu.vm_image_instance': dict(name='ci-1', image='nightly', store=store)},
        _fetch(store, url3),
    ], tmp_path)
    du_before = _du(store)
    run = run_playbook([
        dict(_prune(store), check_mode=True),
        _prune(store),
        _prune(store),
        {'vmimage.qemu.vm_image_info': {'store': store}},
    ], tmp_path, diff=True)
    check, real, again, info = run.results
    du_after = _du(store)

    assert check['changed'] is True and real['changed'] is True and again['changed'] is False
    assert [r['digest'] for r in real['removed']] == [d1] and real['removed'][0]['reason'] == 'unreferenced'
    assert dict((k['digest'], k['reason']) for k in real['kept']) == {d2: 'instance ci-1', d3: 'alias nightly'}
    for key in ('removed', 'kept', 'freed_bytes', 'usage_before', 'usage_after'):
        assert check[key] == real[key], key
    assert real['usage_before'] == du_before and real['usage_after'] == du_after
    assert real['freed_bytes'] == du_before - du_after == real['removed'][0]['bytes'] > 256 * 1024
    assert d1[7:19] in real['diff']['before'] and d1[7:19] not in real['diff']['after']
    assert sorted(i['digest'] for i in info['images']) == sorted([d2, d3])
    assert again['removed'] == [] and again['freed_bytes'] == 0


def test_option_errors_have_their_kind(tmp_path, releases):
    store = str(tmp_path / 'store')
    run = run_playbook([
        _fetch(store, releases[0][0]),
        dict(_prune(store, unused_for='a fortnight'), ignore_errors=True),
        dict(_prune(store, keep_below='200GB'), ignore_errors=True),
        {'vmimage.qemu.vm_image_prune': dict(store=str(tmp_path / 'none'))},
    ], tmp_path)
    _fetched, bad_duration, bad_size, missing = run.results
    assert bad_duration['failed'] is True and bad_duration['error_kind'] == 'invalid_option'
    assert 'unused_for' in bad_duration['msg']
    assert bad_size['failed'] is True and bad_size['error_kind'] == 'invalid_option'
    assert 'keep_below' in bad_size['msg']
    assert missing['changed'] is False and missing['removed'] == [] and not os.path.exists(str(tmp_path / 'none'))


def test_an_image_is_removed_by_its_digest(tmp_path, releases):
    (url1, d1), (url2, _d2), _third = releases
    store = str(tmp_path / 'store')
    run = run_playbook([
        _fetch(store, url1),
        {'vmimage.qemu.vm_image_fetch': dict(url=url1, image_id='second-name', store=store)},
        _fetch(store, url2),
        dict({'vmimage.qemu.vm_image_fetch': dict(image_id=d1, state='absent', store=store)}, check_mode=True),
        {'vmimage.qemu.vm_image_fetch': dict(image_id=d1, state='absent', store=store)},
        {'vmimage.qemu.vm_image_fetch': dict(image_id=d1, state='absent', store=store)},
        {'vmimage.qemu.vm_image_info': {'store': store}},
    ], tmp_path)
    check, removed, again, info = run.results[3:]
    assert check['changed'] is True and check['removed_aliases'] == ['second-name']
    assert removed['changed'] is True and removed['removed_digest'] == d1
    assert removed['removed_aliases'] == ['second-name']
    assert again['changed'] is False and again['removed_aliases'] == []
    assert [i['aliases'] for i in info['images']] == [['nightly']]
