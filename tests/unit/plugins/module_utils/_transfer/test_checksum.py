# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tests for checksum specifications, checksum files and digest comparison."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import hmac

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._transfer import checksum as cs
from ansible_collections.vmimage.qemu.plugins.module_utils._transfer import download as dl
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    ChecksumMismatchError,
    DownloadError,
)
from support.http_server import LocalHTTPServer

pytestmark = pytest.mark.timeout(60)

DATA = b'image bytes\n' * 1000
HEX = {algo: hashlib.new(algo, DATA).hexdigest() for algo in cs.DIGEST_LENGTHS}
OTHER = hashlib.sha256(b'something else').hexdigest()


@pytest.fixture
def http_server():
    with LocalHTTPServer() as server:
        yield server


# -- parse_checksum --------------------------------------------------------

@pytest.mark.parametrize('algo', sorted(cs.DIGEST_LENGTHS))
def test_parse_every_algorithm(algo):
    spec = cs.parse_checksum('%s:%s' % (algo.upper(), HEX[algo].upper()))
    assert spec == cs.ChecksumSpec(algo, HEX[algo], None)
    assert str(spec) == '%s:%s' % (algo, HEX[algo])


def test_parse_trims_whitespace_and_returns_specs_unchanged():
    spec = cs.parse_checksum('  sha256: %s \n' % HEX['sha256'])
    assert spec.hexdigest == HEX['sha256']
    assert cs.parse_checksum(spec) is spec


@pytest.mark.parametrize('bad, words', [
    ('sha256:' + HEX['sha256'][:-1], '64 hex digits, not 63'),
    ('sha256:' + HEX['sha256'] + '0', '64 hex digits, not 65'),
    ('sha512:' + HEX['sha256'], '128 hex digits, not 64'),
    ('md5:' + HEX['sha1'], '32 hex digits, not 40'),
    ('sha256:' + 'g' * 64, 'must be 64 hex digits'),
    ('sha256:', 'must be 64 hex digits'),
    ('sha3_256:' + HEX['sha256'], 'unsupported checksum algorithm'),
    ('crc32:deadbeef', 'unsupported checksum algorithm'),
    (HEX['sha256'], '<algorithm>:<hex digest>'),
    ('', '<algorithm>:<hex digest>'),
    (None, '<algorithm>:<hex digest>'),
    ('sha256:ftp://host/SHA256SUMS', 'or a URL'),
])
def test_parse_rejects(bad, words):
    with pytest.raises(cs.ChecksumSpecError) as info:
        cs.parse_checksum(bad)
    assert isinstance(info.value, ValueError)
    assert words in str(info.value)


def test_unknown_algorithm_error_lists_the_supported_ones():
    with pytest.raises(ValueError) as info:
        cs.parse_checksum('blake2b:00')
    assert 'sha256' in str(info.value) and 'sha512' in str(info.value) and 'recommended' in str(info.value)


def test_parse_urls_and_redacts_them_in_text():
    spec = cs.parse_checksum('sha256:https://user:pw@example.org/img/SHA256SUMS')
    assert spec == cs.ChecksumSpec('sha256', None, 'https://user:pw@example.org/img/SHA256SUMS')
    assert str(spec) == 'sha256:https://example.org/img/SHA256SUMS'
    assert cs.parse_checksum('SHA512:file:///srv/sums').url == 'file:///srv/sums'
    assert cs.parse_checksum('sha1:HTTP://h/x').url == 'HTTP://h/x'


# -- checksum files --------------------------------------------------------

NAME = 'image.tar.zst'


@pytest.mark.parametrize('text', [
    '%s  image.tar.zst\n' % HEX['sha256'],                                    # GNU text mode
    '%s *image.tar.zst\n' % HEX['sha256'],                                    # GNU binary mode
    '%s  ./image.tar.zst\n' % HEX['sha256'],
    '%s  other.img\n%s  images/image.tar.zst\n' % (OTHER, HEX['sha256']),
    '%s image.tar.zst\n' % HEX['sha256'].upper(),                             # hand-written
    '# comment\r\n\r\n%s  image.tar.zst\r\n' % HEX['sha256'],
    'SHA256 (image.tar.zst) = %s\n' % HEX['sha256'],                          # BSD
    'MD5 (image.tar.zst) = %s\nSHA256 (image.tar.zst) = %s\n' % (HEX['md5'], HEX['sha256']),
    'SHA256 (other.img) = %s\nSHA256 (image.tar.zst) = %s\n' % (OTHER, HEX['sha256']),
    '%s\n' % HEX['sha256'],                                                   # bare digest
    '%s  image.tar.zst\n%s  image.tar.zst\n' % (HEX['sha256'], HEX['sha256']),  # duplicate, same
])
def test_find_digest_formats(text):
    assert cs.find_digest(text, 'sha256', NAME) == HEX['sha256']


def test_find_digest_gnu_escaped_name():
    text = '\\%s  dir/we\\\\ird\\nname\n' % HEX['sha256']
    assert cs.find_digest(text, 'sha256', 'we\\ird\nname') == HEX['sha256']


@pytest.mark.parametrize('text, words', [
    ('%s  other.img\n' % HEX['sha256'], 'no sha256 entry for image.tar.zst'),
    ('', 'no sha256 entry'),
    ('MD5 (image.tar.zst) = %s\n' % HEX['md5'], 'no sha256 entry'),
    ('%s  image.tar.zst.sig\n' % HEX['sha256'], 'no sha256 entry'),
    ('%s  image.tar.zst\n%s  mirror/image.tar.zst\n' % (HEX['sha256'], OTHER), 'conflicting'),
    ('%s  image.tar.zst\n' % HEX['sha512'], 'has 128 hex digits, a sha256 digest has 64'),
    ('%s\n' % HEX['md5'], 'has 32 hex digits'),
])
def test_find_digest_errors(text, words):
    with pytest.raises(DownloadError) as info:
        cs.find_digest(text, 'sha256', NAME, 'checksum file X')
    assert words in str(info.value)


def test_resolve_checksum_from_a_server(http_server):
    sums = '%s  other\n%s *image.tar.zst\n' % (OTHER, HEX['sha256'])
    url = http_server.add('/sums/SHA256SUMS', sums.encode())
    target = http_server.url_for('/images/image.tar.zst') + '?version=2'
    spec = cs.resolve_checksum('sha256:' + url, target)
    assert spec == cs.ChecksumSpec('sha256', HEX['sha256'], url)


def test_resolve_checksum_with_credentials_and_bsd_file(http_server, tmp_path):
    http_server.add('/CHECKSUM', ('SHA512 (image.tar.zst) = %s\n' % HEX['sha512']).encode(),
                    auth=('u', 'pw'))
    spec = cs.resolve_checksum('sha512:' + http_server.url_for('/CHECKSUM'),
                               http_server.url_for('/srv/image.tar.zst'), url_username='u', url_password='pw')
    assert spec.hexdigest == HEX['sha512']
    sums = tmp_path / 'sums'
    sums.write_text('%s\n' % HEX['md5'])
    assert cs.resolve_checksum('md5:file://%s' % sums, 'x/y.img').hexdigest == HEX['md5']


def test_resolve_checksum_missing_entry_names_the_file(http_server):
    url = http_server.add('/SHA256SUMS', ('%s  other\n' % OTHER).encode())
    with pytest.raises(DownloadError) as info:
        cs.resolve_checksum('sha256:' + url, 'https://h/dir/image.tar.zst')
    assert str(info.value) == 'checksum file %s has no sha256 entry for image.tar.zst' % url


def test_resolve_checksum_is_bounded(http_server):
    url = http_server.add('/SHA256SUMS', b'0' * (2 * 1024 * 1024))
    with pytest.raises(dl.DownloadTooLargeError):
        cs.resolve_checksum('sha256:' + url, 'https://h/image.tar.zst')
    calls = []

    def fake_open(url, **kw):
        calls.append(kw)
        return dl.open_download(url, **kw)
    url = http_server.add('/small', ('%s  image.tar.zst\n' % HEX['sha256']).encode())
    cs.resolve_checksum('sha256:' + url, 'https://h/image.tar.zst', open_download=fake_open,
                        max_bytes=10 ** 12, timeout=5)
    assert calls == [{'max_bytes': cs.MAX_CHECKSUM_FILE, 'timeout': 5, 'hash_algorithms': (),
                      'credentials_origin': 'https://h/image.tar.zst'}]


def test_checksum_file_gets_the_targets_credentials_only_on_its_origin(http_server):
    sums = ('%s  image.tar.zst\n' % HEX['sha256']).encode()
    secret = dict(url_username='u', url_password='pw', headers={'X-Api-Token': 'tok', 'X-Trace': 't'},
                  force_basic_auth=True)
    with LocalHTTPServer(host='127.0.0.2') as elsewhere:
        url = elsewhere.add('/SHA256SUMS', sums)
        assert cs.resolve_checksum('sha256:' + url, http_server.url_for('/image.tar.zst'), **secret).hexdigest
        seen = elsewhere.requests[0].headers
        assert not set(seen) & {'authorization', 'x-api-token', 'x-trace'}
    url = http_server.add('/SHA256SUMS', sums, auth=('u', 'pw'))
    assert cs.resolve_checksum('sha256:' + url, http_server.url_for('/image.tar.zst'), **secret).hexdigest
    seen = http_server.requests[0].headers
    assert seen['authorization'].startswith('Basic ') and seen['x-api-token'] == 'tok' and seen['x-trace'] == 't'
    # Credentials in the target URL count as the target's too.
    http_server.clear_requests()
    target = http_server.url_for('/image.tar.zst', 'u', 'pw')
    assert cs.resolve_checksum('sha256:' + url, target).hexdigest
    assert [r.status for r in http_server.requests] == [401, 200]


def test_resolve_checksum_hex_needs_no_download():
    def no_download(*a, **kw):
        raise AssertionError('must not download')
    spec = cs.resolve_checksum('sha256:' + HEX['sha256'], 'https://h/x', open_download=no_download)
    assert spec.hexdigest == HEX['sha256']


def test_resolve_checksum_target_without_name():
    with pytest.raises(ValueError):
        cs.resolve_checksum('sha256:https://h/SUMS', 'https://h/', open_download=None)


# -- comparison ------------------------------------------------------------

def test_digest_matches():
    assert cs.digest_matches(HEX['sha256'], HEX['sha256'].upper())
    assert not cs.digest_matches(HEX['sha256'], OTHER)
    assert not cs.digest_matches(HEX['sha256'], HEX['sha256'][:-1])
    assert not cs.digest_matches(HEX['sha256'], None)
    assert not cs.digest_matches(HEX['sha256'], u'\u00e9' * 64)


def test_digest_matches_is_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)
    monkeypatch.setattr(cs.hmac, 'compare_digest', spy)
    assert cs.digest_matches(HEX['sha256'], HEX['sha256'])
    assert calls == [(HEX['sha256'].encode(), HEX['sha256'].encode())]
    calls[:] = []
    with pytest.raises(ChecksumMismatchError):
        cs.verify_digest('sha256:' + HEX['sha256'], OTHER, 'https://h/x')
    assert len(calls) == 1


def test_verify_digest_message():
    cs.verify_digest('sha256:' + HEX['sha256'], HEX['sha256'], 'https://h/x')
    with pytest.raises(ChecksumMismatchError) as info:
        cs.verify_digest('sha256:' + HEX['sha256'], OTHER, 'https://me:pw@h/img.tar.zst')
    assert str(info.value) == ('checksum mismatch for https://h/img.tar.zst: expected sha256:%s, got sha256:%s'
                               % (HEX['sha256'], OTHER))
    with pytest.raises(ValueError):
        cs.verify_digest('sha256:https://h/SUMS', OTHER, 'https://h/x')


def test_streamed_digest_checked_end_to_end(http_server):
    url = http_server.add('/img.tar.zst', DATA)
    sums = http_server.add('/SHA512SUMS', ('%s  img.tar.zst\n' % HEX['sha512']).encode())
    spec = cs.resolve_checksum('sha512:' + sums, url)
    with dl.open_download(url, hash_algorithms=(spec.algorithm,)) as stream:
        while stream.read(4096):
            pass
        cs.verify_digest(spec, stream.hexdigest(spec.algorithm), stream.source)
    http_server.add('/img.tar.zst', DATA + b'tampered')
    with dl.open_download(url, hash_algorithms=(spec.algorithm,)) as stream:
        stream.read()
        with pytest.raises(ChecksumMismatchError):
            cs.verify_digest(spec, stream.hexdigest(spec.algorithm), stream.source)
