# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tests for the streaming downloader, against a real HTTP server on 127.0.0.1."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import hashlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from urllib.parse import urlsplit

import pytest
import requests

from ansible_collections.vmimage.qemu.plugins.module_utils._transfer import download as dl
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    DownloadError,
    InvalidOptionError,
    LimitExceededError,
    MissingLibraryError,
)
from support.http_server import LocalHTTPServer

pytestmark = pytest.mark.timeout(60)

DATA = os.urandom(1536 * 1024 + 123)   # 1.5 MiB and an odd tail
SHA = hashlib.sha256(DATA).hexdigest()
BASE = 0.01                             # backoff_base: tests record sleeps, never wait
PASSWORD = 's3cret-Pa55'
# The collection root: the nearest folder up from here holding galaxy.yml.
REPO = os.path.abspath(__file__)
while not os.path.exists(os.path.join(REPO, 'galaxy.yml')) and REPO != os.path.dirname(REPO):
    REPO = os.path.dirname(REPO)


@pytest.fixture
def http_server():
    with LocalHTTPServer() as server:
        yield server


@pytest.fixture
def sleeps():
    return []


def fetch(url, sleeps, **kw):
    kw.setdefault('backoff_base', BASE)
    kw.setdefault('timeout', 5)
    return dl.open_download(url, sleep=sleeps.append, **kw)


def read_all(stream, size=64 * 1024):
    """Read like the store does: in pieces, starting over on a restart."""
    parts = []
    while True:
        try:
            chunk = stream.read(size)
        except dl.DownloadRestartRequired:
            parts = []
            continue
        if not chunk:
            return b''.join(parts)
        parts.append(chunk)


def basic(user, password):
    return 'Basic ' + base64.b64encode(('%s:%s' % (user, password)).encode()).decode()


def closed_port():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# -- retries ---------------------------------------------------------------

def test_5xx_then_success_backs_off_with_growing_jittered_delays(http_server, sleeps):
    url = http_server.add('/img', DATA, fail_first=3, fail_status=503)
    with fetch(url, sleeps) as stream:
        assert stream.read() == DATA
        assert stream.hexdigest('sha256') == SHA
        assert stream.attempts == 4
    assert [r.status for r in http_server.requests] == [503, 503, 503, 200]
    assert len(sleeps) == 3
    for n, delay in enumerate(sleeps, 1):
        nominal = BASE * 2 ** (n - 1)
        assert nominal * 0.75 <= delay <= nominal * 1.25
    assert sleeps[0] < sleeps[1] < sleeps[2]


def test_jitter_varies_between_runs(http_server):
    http_server.add('/img', b'x')
    seen = set()
    for i in range(5):
        sleeps = []
        http_server.add('/img', b'x', fail_first=1)
        fetch(http_server.url_for('/img'), sleeps).close()
        seen.add(sleeps[0])
    assert len(seen) > 1


def test_backoff_is_capped_at_backoff_max(http_server, sleeps):
    url = http_server.add('/img', b'data', fail_first=6, fail_status=500)
    with fetch(url, sleeps, backoff_base=1.0, backoff_max=3.0) as stream:
        assert stream.read() == b'data'
    assert len(sleeps) == 6
    assert max(sleeps) <= 3.0
    assert sleeps[-1] == 3.0


def test_408_is_retried(http_server, sleeps):
    url = http_server.add('/img', b'data', fail_first=1, fail_status=408)
    with fetch(url, sleeps) as stream:
        assert stream.read() == b'data'
    assert len(sleeps) == 1


def test_429_retry_after_is_honoured_and_capped(http_server, sleeps):
    url = http_server.add('/img', DATA, retry_after=7, retry_after_first=2)
    with fetch(url, sleeps) as stream:
        assert stream.read() == DATA
    assert sleeps == [7.0, 7.0]
    assert [r.status for r in http_server.requests] == [429, 429, 200]

    del sleeps[:]
    url = http_server.add('/img2', DATA, retry_after=3600)
    with fetch(url, sleeps, backoff_max=5.0) as stream:
        assert stream.read() == DATA
    assert sleeps == [5.0]


def test_retry_after_parsing():
    assert dl._parse_retry_after('12') == 12.0
    assert dl._parse_retry_after(None) is None
    assert dl._parse_retry_after('soon') is None
    when = time.time() + 30
    import email.utils
    seconds = dl._parse_retry_after(email.utils.formatdate(when, usegmt=True))
    assert 25 <= seconds <= 31
    assert dl._parse_retry_after('Mon, 01 Jan 2001 00:00:00 GMT') == 0.0


def test_404_fails_at_once_with_status_and_url(http_server, sleeps):
    url = http_server.add('/missing', status=404)
    with pytest.raises(DownloadError) as info:
        fetch(url, sleeps)
    assert '404' in str(info.value)
    assert url in str(info.value)
    assert info.value.status == 404
    assert sleeps == []
    assert len(http_server.requests) == 1


def test_3xx_not_followed_fails_at_once(http_server, sleeps):
    url = http_server.add('/choices', status=300)
    with pytest.raises(DownloadError, match='HTTP 300'):
        fetch(url, sleeps)
    assert sleeps == []


def test_retries_exhausted_message(http_server, sleeps):
    url = http_server.add('/img', DATA, fail_first=100, fail_status=502)
    with pytest.raises(DownloadError) as info:
        fetch(url, sleeps, retries=3)
    msg = str(info.value)
    assert url in msg and 'HTTP 502' in msg and 'gave up after 4 attempts' in msg
    assert len(sleeps) == 3
    assert len(http_server.requests) == 4


def test_connection_refused_is_retried_then_fails(sleeps):
    url = 'http://127.0.0.1:%d/img' % closed_port()
    with pytest.raises(DownloadError) as info:
        fetch(url, sleeps, retries=2)
    assert 'gave up after 3 attempts' in str(info.value)
    assert 'ConnectionError' in str(info.value)
    assert len(sleeps) == 2


def test_slow_server_read_timeout_is_retried(http_server, sleeps):
    data = os.urandom(20000)
    # 2 bytes/s: one byte every half second, longer than the read timeout.
    url = http_server.add('/img', data, slow=2, slow_first=1)
    started = time.monotonic()
    with fetch(url, sleeps, timeout=0.3) as stream:
        assert stream.read() == data
        assert stream.attempts == 2
    assert time.monotonic() - started < 5
    assert len(sleeps) == 1


# -- resume and restart ----------------------------------------------------

def test_cut_mid_body_resumes_with_only_the_rest(http_server, sleeps):
    url = http_server.add('/img', DATA, cut_after=300000)
    with fetch(url, sleeps) as stream:
        assert read_all(stream) == DATA
        assert stream.hexdigest('sha256') == SHA
        assert (stream.resumed, stream.restarts, stream.attempts) == (1, 0, 2)
        assert stream.total_size == len(DATA)
    first, second = http_server.requests
    assert (first.range, first.status, first.sent) == (None, 200, 300000)
    assert second.range == 'bytes=300000-'
    assert second.if_range.startswith('"')            # the strong ETag
    assert (second.status, second.sent) == (206, len(DATA) - 300000)
    # Exactly one full body crossed the wire.
    assert sum(r.sent for r in http_server.requests) == len(DATA)
    # Offsets and checksums refer to the bytes as stored: no on-the-fly compression.
    assert all(r.headers['accept-encoding'] == 'identity' for r in http_server.requests)


LM = 'Sat, 01 Jan 2000 00:00:00 GMT'


class FakeResponse(object):
    def __init__(self, status_code, **headers):
        self.status_code = status_code
        self.headers = dict((k.replace('_', '-'), v) for k, v in headers.items())


@pytest.mark.parametrize('content_range, etag, expected', [
    ('bytes 100-999/1000', '"v1"', (100, 1000, None)),
    ('bytes 100-999/*', None, (100, None, None)),
    ('bytes 100-499/1000', '"v1"', 'partial Content-Range'),
    ('bytes 100-1999/2000', '"v1"', 'size changed from 1000 to 2000'),
    ('bytes 100-999/1000', '"v2"', 'content changed'),
    ('bytes */1000', '"v1"', 'unusable Content-Range'),
    (None, '"v1"', 'unusable Content-Range'),
])
def test_resume_answers_are_checked(content_range, etag, expected):
    stream = dl._HttpStream.__new__(dl._HttpStream)
    stream.total_size = 1000
    stream._validator = '"v1"'
    check_resume_answer(stream, content_range, etag, expected)


@pytest.mark.parametrize('modified, expected', [
    (LM, (100, 1000, None)),
    ('Sun, 02 Jan 2000 00:00:00 GMT', 'content changed'),
])
def test_resume_answers_checked_against_last_modified(modified, expected):
    stream = dl._HttpStream.__new__(dl._HttpStream)
    stream.total_size = 1000
    stream._validator = LM
    # An ETag the first answer did not have is not mistaken for a change.
    check_resume_answer(stream, 'bytes 100-999/1000', '"new"', expected, Last_Modified=modified)


def check_resume_answer(stream, content_range, etag, expected, **headers):
    if content_range:
        headers['Content_Range'] = content_range
    if etag:
        headers['ETag'] = etag
    start, total, problem = stream._body_start(FakeResponse(206, **headers))
    if isinstance(expected, tuple):
        assert (start, total, problem) == expected
    else:
        assert expected in problem


def test_repeated_cuts_with_progress_do_not_exhaust_retries(http_server, sleeps):
    data = os.urandom(50000)
    url = http_server.add('/img', data, cut_after=5000, cut_first=9)
    with fetch(url, sleeps, retries=2) as stream:
        assert read_all(stream, 3000) == data
        assert stream.resumed == 9
    assert [r.range for r in http_server.requests][1:3] == ['bytes=5000-', 'bytes=10000-']
    assert sum(r.sent for r in http_server.requests) == len(data)
    # Progress resets the backoff too: every delay is a first-retry delay.
    assert max(sleeps) <= BASE * 1.25


def test_resume_with_last_modified_when_no_etag(http_server, sleeps):
    url = http_server.add('/img', DATA, cut_after=1000, etag=False)
    with fetch(url, sleeps) as stream:
        assert read_all(stream) == DATA
        assert stream.resumed == 1
    assert http_server.requests[1].if_range.endswith('GMT')


def test_chunked_body_cut_resumes(http_server, sleeps):
    url = http_server.add('/img', DATA, cut_after=200000, chunked=True)
    with fetch(url, sleeps) as stream:
        assert stream.total_size is None
        assert read_all(stream) == DATA
        assert stream.hexdigest('sha256') == SHA
        assert stream.resumed == 1


def test_no_range_server_restarts_from_zero_without_refetching(http_server, sleeps):
    url = http_server.add('/img', DATA, cut_after=300000, no_range=True)
    with fetch(url, sleeps) as stream:
        got = stream.read(200000)
        with pytest.raises(dl.DownloadRestartRequired) as info:
            while stream.read(65536):
                pass
        assert 'restarts from byte 0' in str(info.value)
        assert isinstance(info.value, DownloadError)
        # The stream reset itself before telling the caller.
        assert stream.bytes_read == 0
        assert stream.hexdigest('sha256') == hashlib.sha256(b'').hexdigest()
        assert stream.restarts == 1
        assert stream.read() == DATA
        assert stream.hexdigest('sha256') == SHA
    assert got == DATA[:200000]
    # The full 200 that refused the resume is the one delivered: no third request.
    assert [(r.range, r.status) for r in http_server.requests] == [
        (None, 200), ('bytes=300000-', 200)]


def test_validator_changed_restarts_with_new_content(http_server, sleeps):
    new = os.urandom(len(DATA))
    url = http_server.add('/img', DATA, cut_after=100000, change_etag_after=1, new_data=new)
    with fetch(url, sleeps) as stream:
        assert read_all(stream) == new
        assert stream.hexdigest('sha256') == hashlib.sha256(new).hexdigest()
        assert stream.restarts == 1 and stream.resumed == 0
    first, second = http_server.requests
    assert second.if_range is not None and second.status == 200


def test_server_ignoring_if_range_is_caught_by_the_validator(http_server, sleeps):
    new = os.urandom(len(DATA))
    url = http_server.add('/img', DATA, cut_after=100000, change_etag_after=1, new_data=new,
                          ignore_if_range=True)
    with fetch(url, sleeps) as stream:
        assert read_all(stream) == new
        assert stream.restarts == 1
    statuses = [(r.range is not None, r.status) for r in http_server.requests]
    # The 206 carried the new ETag: refused, then the whole new body.
    assert statuses == [(False, 200), (True, 206), (False, 200)]


def test_no_validator_means_no_blind_range(http_server, sleeps):
    url = http_server.add('/img', DATA, cut_after=1000, etag=False, last_modified=False)
    with fetch(url, sleeps) as stream:
        assert read_all(stream) == DATA
        assert stream.restarts == 1
    assert [r.range for r in http_server.requests] == [None, None]


def test_endless_restarts_are_bounded_by_retries(http_server, sleeps):
    url = http_server.add('/img', DATA, cut_after=5000, cut_first=100, no_range=True)
    with fetch(url, sleeps, retries=2) as stream:
        with pytest.raises(DownloadError) as info:
            read_all(stream)
        assert not isinstance(info.value, dl.DownloadRestartRequired)
        assert stream.closed


# -- limits ----------------------------------------------------------------

def test_max_bytes_fails_early_on_content_length(http_server, sleeps):
    url = http_server.add('/img', DATA)
    with pytest.raises(dl.DownloadTooLargeError) as info:
        fetch(url, sleeps, max_bytes=len(DATA) - 1)
    assert isinstance(info.value, LimitExceededError)
    assert isinstance(info.value, DownloadError)
    assert str(len(DATA)) in str(info.value)


def spy_reads(stream):
    """Record the sizes the stream asks of the socket."""
    raw = stream._resp.raw
    sizes = []
    real_read = raw.read

    def spy(amt=None, **kw):
        sizes.append(amt)
        return real_read(amt, **kw)
    raw.read = spy
    return sizes


def test_max_bytes_while_streaming_unknown_length(http_server, sleeps):
    url = http_server.add('/img', DATA, chunked=True)
    with fetch(url, sleeps, max_bytes=100000) as stream:
        assert len(stream.read(100000)) == 100000
        with pytest.raises(dl.DownloadTooLargeError):
            stream.read(10)
        assert stream.bytes_read == 100000
        assert stream.closed
    with fetch(url, sleeps, max_bytes=100000) as stream:
        sizes = spy_reads(stream)
        with pytest.raises(dl.DownloadTooLargeError):
            stream.read()
        # Never more than one byte past the limit is taken off the wire.
        assert sum(sizes) == 100001
    with fetch(url, sleeps, max_bytes=len(DATA)) as stream:
        assert stream.read() == DATA


def test_reads_are_bounded_to_chunk_size(http_server, sleeps):
    url = http_server.add('/img', DATA * 2)
    with fetch(url, sleeps) as stream:
        sizes = spy_reads(stream)
        assert stream.read(10 * 1024 * 1024) == DATA * 2
    assert sizes and all(s is not None and s <= dl.CHUNK_SIZE for s in sizes)


def test_every_response_is_closed(http_server, sleeps, monkeypatch):
    responses = []
    real_get = requests.Session.get

    def get(self, *args, **kw):
        resp = real_get(self, *args, **kw)
        responses.append(resp)
        return resp
    monkeypatch.setattr(requests.Session, 'get', get)
    url = http_server.add('/img', DATA, fail_first=1, cut_after=1000)
    with fetch(url, sleeps) as stream:
        assert read_all(stream) == DATA
    url = http_server.add('/gone', status=404)
    with pytest.raises(DownloadError):
        fetch(url, sleeps)
    assert len(responses) == 4
    assert all(r.raw.closed for r in responses)


# -- local files -----------------------------------------------------------

def test_file_url_and_plain_path(tmp_path, sleeps):
    path = tmp_path / 'image file.bin'
    path.write_bytes(DATA)
    for url in (str(path), 'file://' + urllib.request.pathname2url(str(path))):
        with dl.open_download(url, hash_algorithms=('sha256', 'sha512')) as stream:
            assert stream.total_size == len(DATA)
            assert read_all(stream) == DATA
            assert stream.hexdigest('sha256') == SHA
            assert stream.hexdigest('SHA512') == hashlib.sha512(DATA).hexdigest()
            assert stream.attempts == 1
    with pytest.raises(dl.DownloadTooLargeError):
        dl.open_download(str(path), max_bytes=10)


def test_local_errors(tmp_path):
    with pytest.raises(DownloadError, match='No such file'):
        dl.open_download(str(tmp_path / 'nope'))
    with pytest.raises(DownloadError, match='not a regular file'):
        dl.open_download(str(tmp_path))
    for url in ('relative/path.img', 'ftp://host/x', 'file://otherhost/x'):
        with pytest.raises(DownloadError):
            dl.open_download(url)


# -- credentials -----------------------------------------------------------

def test_redact_url():
    assert dl.redact_url('https://u:p@host/x?token=1') == 'https://host/x?token=1'
    assert dl.redact_url('https://u:p@ss@host:8443/x') == 'https://host:8443/x'
    assert dl.redact_url('http://host/a@b') == 'http://host/a@b'
    assert dl.redact_url('/local/path') == '/local/path'
    assert dl.redact_url('see http://me:pw@h/1 and https://x@h/2') == 'see http://h/1 and https://h/2'


def test_basic_auth_with_url_credentials_and_arguments(http_server, sleeps):
    http_server.add('/img', DATA, auth=('alice', PASSWORD))
    url = http_server.url_for('/img', 'alice', PASSWORD)
    with fetch(url, sleeps) as stream:
        assert stream.source == http_server.url_for('/img')
        assert read_all(stream) == DATA
    with fetch(http_server.url_for('/img'), sleeps, url_username='alice', url_password=PASSWORD) as stream:
        assert read_all(stream) == DATA
    # Each time the password waits for the server's challenge.
    assert [r.authorization for r in http_server.requests] == [None, basic('alice', PASSWORD)] * 2
    assert [r.status for r in http_server.requests] == [401, 200] * 2


def test_credentials_never_in_errors_source_or_logs(http_server, sleeps):
    http_server.add('/img', DATA, auth=('alice', PASSWORD))
    bad = http_server.url_for('/img', 'alice', 'wrong-' + PASSWORD)
    with pytest.raises(DownloadError) as info:
        fetch(bad, sleeps)
    assert '401' in str(info.value) and http_server.url_for('/img') in str(info.value)
    assert PASSWORD not in str(info.value) and 'alice' not in str(info.value)

    logs = []
    http_server.add('/flaky', DATA, auth=('alice', PASSWORD), fail_first=1, cut_after=10)
    with fetch(http_server.url_for('/flaky', 'alice', PASSWORD), sleeps, logger=logs.append) as stream:
        assert read_all(stream) == DATA
        assert PASSWORD not in repr(stream) and PASSWORD not in stream.source
    assert len(logs) >= 2 and not any(PASSWORD in line for line in logs)

    refused = 'http://alice:%s@127.0.0.1:%d/img' % (PASSWORD, closed_port())
    with pytest.raises(DownloadError) as info:
        fetch(refused, sleeps, retries=1)
    assert PASSWORD not in str(info.value)


def test_transport_error_text_is_scrubbed_of_the_password(http_server, sleeps, monkeypatch):
    # Whatever a proxy or library puts in its message, the password is masked.
    def get(self, url, **kw):
        raise requests.exceptions.ConnectionError('proxy said: bad password %s' % PASSWORD)
    monkeypatch.setattr(requests.Session, 'get', get)
    logs = []
    with pytest.raises(DownloadError) as info:
        fetch(http_server.url_for('/img'), sleeps, retries=1, url_username='alice',
              url_password=PASSWORD, logger=logs.append)
    assert PASSWORD not in str(info.value) and 'bad password ********' in str(info.value)
    assert logs and not any(PASSWORD in line for line in logs)


# -- mirrors ---------------------------------------------------------------

def test_fetch_first_tries_mirrors_in_order(http_server, sleeps):
    m1 = http_server.add('/m1/img', status=404)
    m2 = 'http://127.0.0.1:%d/m2/img' % closed_port()
    primary = http_server.add('/img', DATA)
    with dl.fetch_first([m1, m2, primary], retries=1, backoff_base=BASE, sleep=sleeps.append) as stream:
        assert stream.source == primary
        assert read_all(stream) == DATA
    assert [r.path for r in http_server.requests] == ['/m1/img', '/img']


def test_fetch_first_first_mirror_wins(http_server, sleeps):
    m1 = http_server.add('/m1/img', DATA)
    primary = http_server.add('/img', DATA)
    with dl.fetch_first([m1, primary], sleep=sleeps.append) as stream:
        assert stream.source == m1
    assert [r.path for r in http_server.requests] == ['/m1/img']


def test_fetch_first_aggregates_every_failure(http_server, sleeps):
    m1 = http_server.add('/m1/img', status=403)
    m2 = http_server.url_for('/m2/img', 'bob', PASSWORD)   # not registered: 404
    primary = http_server.add('/img', DATA, fail_first=10)
    with pytest.raises(DownloadError) as info:
        dl.fetch_first([m1, m2, primary], retries=1, backoff_base=BASE, sleep=sleeps.append)
    msg = str(info.value)
    assert msg.startswith('all 3 sources failed: ')
    positions = [msg.index(u) for u in (m1, http_server.url_for('/m2/img'), primary)]
    assert positions == sorted(positions)
    assert 'HTTP 403' in msg and 'HTTP 404' in msg and 'HTTP 503' in msg
    assert PASSWORD not in msg
    assert [u for u, reason in info.value.failures] == [m1, http_server.url_for('/m2/img'), primary]


def test_fetch_first_single_url_raises_its_own_error(http_server, sleeps):
    url = http_server.add('/img', DATA)
    with pytest.raises(dl.DownloadTooLargeError):
        dl.fetch_first(url, max_bytes=10, sleep=sleeps.append)


# -- credentials stay with their origin -------------------------------------

TOKEN = 'tok-9f8e7d6c'
GIVEN_HEADERS = {'Authorization-Token': TOKEN, 'X-Trace': 'trace-1'}


@pytest.fixture
def other_server():
    """A second origin: same scheme, another loopback address."""
    with LocalHTTPServer(host='127.0.0.2') as server:
        yield server


def carried(request):
    """What a recorded request carried of the credentials the tests give."""
    return dict((k, v) for k, v in request.headers.items() if k in ('authorization', 'authorization-token', 'x-trace'))


def test_origin_of_normalises_default_ports():
    assert dl.origin_of('https://H.example/a') == dl.origin_of('https://h.example:443/b') == 'https://h.example:443'
    assert dl.origin_of('http://u:p@h:80/x') == 'http://h:80'
    assert dl.origin_of('http://[::1]/x') == 'http://[::1]:80'
    assert dl.origin_of('http://h:8080/') != dl.origin_of('http://h/')
    assert dl.origin_of('https://h/') != dl.origin_of('http://h:443/')
    assert dl.origin_of('/local/path') is None and dl.origin_of('http://h:99999/') is None


def test_is_secret_header():
    for name in ('Authorization', 'proxy-authorization', 'Cookie', 'X-Api-Key', 'PRIVATE-TOKEN', 'X-Secret',
                 'X-Auth-User', 'X-Password'):
        assert dl.is_secret_header(name), name
    for name in ('Accept', 'X-Trace', 'User-Agent'):
        assert not dl.is_secret_header(name), name


def test_force_basic_auth_sends_the_credentials_at_once(http_server, sleeps):
    http_server.add('/img', DATA, auth=('alice', PASSWORD))
    with fetch(http_server.url_for('/img'), sleeps, url_username='alice', url_password=PASSWORD,
               force_basic_auth=True) as stream:
        assert read_all(stream) == DATA
    assert [r.authorization for r in http_server.requests] == [basic('alice', PASSWORD)]


def test_challenge_is_remembered_for_resumes(http_server, sleeps):
    http_server.add('/img', DATA, auth=('alice', PASSWORD), cut_after=1000)
    with fetch(http_server.url_for('/img'), sleeps, url_username='alice', url_password=PASSWORD) as stream:
        assert read_all(stream) == DATA
    assert [(r.status, r.authorization is not None) for r in http_server.requests] == [
        (401, False), (200, True), (206, True)]


def test_401_without_credentials_is_a_clear_download_error(http_server, sleeps):
    url = http_server.add('/img', DATA, auth=('alice', PASSWORD))
    with pytest.raises(DownloadError) as info:
        fetch(url, sleeps)
    assert info.value.status == 401 and info.value.kind == 'download'
    assert str(info.value) == (
        'download of %s failed: HTTP 401 Unauthorized: http://127.0.0.1:%d asks for authentication and no '
        'credentials were given for it (url_username and url_password, or user information in the URL; '
        'a mirror needs its own)' % (url, http_server.port))
    with pytest.raises(DownloadError, match='rejected the credentials'):
        fetch(url, sleeps, url_username='alice', url_password='wrong')
    assert sleeps == []


def test_401_with_another_scheme_names_it(http_server, sleeps):
    url = http_server.add('/img', status=401, headers={'WWW-Authenticate': 'Bearer realm="x"'})
    with pytest.raises(DownloadError, match='asks for Bearer authentication') as info:
        fetch(url, sleeps, url_username='alice', url_password=PASSWORD)
    assert info.value.status == 401
    assert [r.authorization for r in http_server.requests] == [None]


def test_mirror_on_another_origin_gets_no_credentials(http_server, other_server, sleeps):
    primary = http_server.add('/img', DATA, auth=('alice', PASSWORD))
    mirror = other_server.add('/img', DATA)
    with dl.fetch_first([mirror, primary], url_username='alice', url_password=PASSWORD,
                        headers=GIVEN_HEADERS, force_basic_auth=True, sleep=sleeps.append) as stream:
        assert stream.source == mirror and read_all(stream) == DATA
    assert [carried(r) for r in other_server.requests] == [{}]
    assert http_server.requests == []


def test_mirror_on_another_origin_asking_for_auth_fails_over_to_the_primary(http_server, other_server, sleeps):
    primary = http_server.add('/img', DATA, auth=('alice', PASSWORD))
    mirror = other_server.add('/img', DATA, auth=('alice', PASSWORD))
    with dl.fetch_first([mirror, primary], url_username='alice', url_password=PASSWORD,
                        headers=GIVEN_HEADERS, sleep=sleeps.append) as stream:
        assert stream.source == primary and read_all(stream) == DATA
    assert [(r.status, carried(r)) for r in other_server.requests] == [(401, {})]
    assert [(r.status, carried(r)) for r in http_server.requests] == [
        (401, {'authorization-token': TOKEN, 'x-trace': 'trace-1'}),
        (200, {'authorization': basic('alice', PASSWORD), 'authorization-token': TOKEN, 'x-trace': 'trace-1'})]


def test_mirror_on_the_same_origin_gets_the_primary_credentials(http_server, sleeps):
    primary = http_server.url_for('/img', 'alice', PASSWORD)
    mirror = http_server.add('/mirror/img', DATA, auth=('alice', PASSWORD))
    with dl.fetch_first([mirror, primary], headers=GIVEN_HEADERS, force_basic_auth=True,
                        sleep=sleeps.append) as stream:
        assert stream.source == mirror and read_all(stream) == DATA
    assert [carried(r) for r in http_server.requests] == [
        {'authorization': basic('alice', PASSWORD), 'authorization-token': TOKEN, 'x-trace': 'trace-1'}]


def test_mirror_dict_gets_exactly_its_own_credentials(http_server, other_server, sleeps):
    primary = http_server.add('/img', DATA)
    mirror = other_server.add('/img', DATA, auth=('bob', 'mirror-pw'))
    entry = {'url': mirror, 'url_username': 'bob', 'url_password': 'mirror-pw', 'headers': {'X-Trace': 'mirror'}}
    with dl.fetch_first([entry, primary], url_username='alice', url_password=PASSWORD, headers=GIVEN_HEADERS,
                        sleep=sleeps.append) as stream:
        assert stream.source == mirror and read_all(stream) == DATA
    assert [carried(r) for r in other_server.requests] == [
        {'x-trace': 'mirror'}, {'x-trace': 'mirror', 'authorization': basic('bob', 'mirror-pw')}]
    # A dict without credentials of its own gets none, even on the primary's origin.
    same_origin = http_server.add('/mirror/img', DATA)
    with dl.fetch_first([{'url': same_origin}, primary], url_username='alice', url_password=PASSWORD,
                        headers=GIVEN_HEADERS, force_basic_auth=True, sleep=sleeps.append) as stream:
        assert stream.source == same_origin
    assert [carried(r) for r in http_server.requests] == [{}]


@pytest.mark.parametrize('mirrors, words', [
    ('http://h/x', 'mirrors must be a list'),
    ([42], 'mirrors[0] must be a URL or a dict'),
    (['http://h/x', {'url_username': 'u'}], 'mirrors[1] needs url'),
    ([{'url': 'http://h/x', 'password': 'pw'}], 'mirrors[0] has unknown keys password; a mirror dict takes url,'),
    ([{'url': 'http://h/x', 'url_password': 12}], 'mirrors[0]: url_password must be a string'),
    ([{'url': 'http://h/x', 'headers': ['a']}], 'mirrors[0]: headers must be a dict'),
    ([''], 'mirrors[0] is an empty URL'),
])
def test_check_mirrors_names_the_bad_entry(mirrors, words):
    with pytest.raises(InvalidOptionError) as info:
        dl.check_mirrors(mirrors)
    assert words in str(info.value) and info.value.kind == 'invalid_option'
    assert '12' not in str(info.value)


def test_cross_origin_redirect_drops_credentials_and_headers(http_server, other_server, sleeps):
    target = other_server.add('/img', DATA)
    url = http_server.add('/moved', status=302, headers={'Location': target})
    with fetch(url, sleeps, url_username='alice', url_password=PASSWORD, headers=GIVEN_HEADERS,
               force_basic_auth=True) as stream:
        assert stream.source == url and read_all(stream) == DATA
    assert [carried(r) for r in http_server.requests] == [
        {'authorization': basic('alice', PASSWORD), 'authorization-token': TOKEN, 'x-trace': 'trace-1'}]
    assert [carried(r) for r in other_server.requests] == [{}]


def test_same_origin_redirect_keeps_them_and_resumes_through_it(http_server, sleeps):
    http_server.add('/img', DATA, auth=('alice', PASSWORD), cut_after=5000)
    url = http_server.add('/moved', status=301, headers={'Location': '/img'})
    with fetch(url, sleeps, url_username='alice', url_password=PASSWORD, headers=GIVEN_HEADERS) as stream:
        assert read_all(stream) == DATA and stream.resumed == 1
    paths = [(r.path, r.status, 'authorization' in r.headers, r.headers.get('x-trace')) for r in http_server.requests]
    # The challenge is answered where it came from; the resume starts over at /moved.
    assert paths == [('/moved', 301, False, 'trace-1'), ('/img', 401, False, 'trace-1'),
                     ('/img', 200, True, 'trace-1'),
                     ('/moved', 301, True, 'trace-1'), ('/img', 206, True, 'trace-1')]
    assert http_server.requests[-1].range == 'bytes=5000-'


def test_unredirected_headers_are_not_sent_after_a_redirect(http_server, sleeps):
    http_server.add('/img', DATA)
    url = http_server.add('/moved', status=307, headers={'Location': '/img'})
    with fetch(url, sleeps, url_username='alice', url_password=PASSWORD, headers=GIVEN_HEADERS,
               force_basic_auth=True, unredirected_headers=['x-trace', 'AUTHORIZATION']) as stream:
        assert read_all(stream) == DATA
    first, second = http_server.requests
    assert carried(first) == {'authorization': basic('alice', PASSWORD), 'authorization-token': TOKEN,
                              'x-trace': 'trace-1'}
    assert carried(second) == {'authorization-token': TOKEN}


def test_redirects_are_bounded_and_http_only(http_server, sleeps):
    url = http_server.add('/loop', status=302, headers={'Location': '/loop'})
    with pytest.raises(DownloadError, match='more than 10 redirects'):
        fetch(url, sleeps)
    assert len(http_server.requests) == dl.MAX_REDIRECTS + 1
    url = http_server.add('/ftp', status=302, headers={'Location': 'ftp://u:%s@h/x' % PASSWORD})
    with pytest.raises(DownloadError, match=r'redirected to ftp://h/x, which is not an http') as info:
        fetch(url, sleeps)
    assert PASSWORD not in str(info.value)


def test_http_agent_default_and_override(http_server, sleeps):
    url = http_server.add('/img', DATA)
    with open(os.path.join(REPO, 'galaxy.yml')) as f:
        version = [line.split(':', 1)[1].strip() for line in f if line.startswith('version:')][0]
    assert dl.COLLECTION_VERSION == version
    fetch(url, sleeps).close()
    fetch(url, sleeps, http_agent='fleet-cache/2').close()
    assert [r.headers['user-agent'] for r in http_server.requests] == ['vmimage.qemu/' + version, 'fleet-cache/2']


def test_use_proxy_false_ignores_the_proxy_environment(http_server, sleeps, monkeypatch):
    url = http_server.add('/img', DATA)
    for name in ('no_proxy', 'NO_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('http_proxy', 'http://127.0.0.1:%d' % closed_port())
    with pytest.raises(DownloadError, match='ProxyError'):
        fetch(url, sleeps, retries=0)
    with fetch(url, sleeps, retries=0, use_proxy=False) as stream:
        assert read_all(stream) == DATA


def test_netrc_credentials_stay_with_their_host(http_server, other_server, sleeps, monkeypatch, tmp_path):
    (tmp_path / '.netrc').write_text('machine 127.0.0.1 login nina password %s\n' % PASSWORD)
    os.chmod(str(tmp_path / '.netrc'), 0o600)
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.delenv('NETRC', raising=False)
    url = http_server.add('/img', DATA, auth=('nina', PASSWORD))
    with fetch(url, sleeps) as stream:
        assert read_all(stream) == DATA
    assert [r.authorization for r in http_server.requests] == [None, basic('nina', PASSWORD)]
    with pytest.raises(DownloadError, match='no credentials were given'):
        fetch(url, sleeps, use_netrc=False)
    # A redirect to another host finds no entry for it, even with force_basic_auth.
    other_server.add('/img', DATA, auth=('nina', PASSWORD))
    moved = http_server.add('/moved', status=302, headers={'Location': other_server.url_for('/img')})
    http_server.clear_requests()
    with pytest.raises(DownloadError, match='127.0.0.2:%d asks for authentication' % other_server.port):
        fetch(moved, sleeps, force_basic_auth=True)
    assert [r.authorization for r in http_server.requests] == [basic('nina', PASSWORD)]
    assert [r.authorization for r in other_server.requests] == [None]


def test_secret_header_values_never_in_errors(http_server, sleeps):
    url = http_server.add('/img', DATA)
    with pytest.raises(DownloadError) as info:
        fetch(url, sleeps, headers={'X-Api-Key': ' ' + TOKEN + '\n'})
    assert 'header' in str(info.value) and TOKEN not in str(info.value)


# -- API details -----------------------------------------------------------

def test_stream_api(http_server, sleeps):
    url = http_server.add('/img', DATA)
    stream = fetch(url, sleeps, hash_algorithms=('md5', 'sha256'))
    assert stream.readable() and not stream.seekable()
    buf = bytearray(1000)
    assert stream.readinto(buf) == 1000 and bytes(buf) == DATA[:1000]
    assert stream.read(0) == b''
    assert stream.read() == DATA[1000:]
    assert stream.read() == b''
    assert stream.hexdigest('md5') == hashlib.md5(DATA).hexdigest()
    with pytest.raises(ValueError):
        stream.hexdigest('sha512')
    stream.close()
    assert stream.closed
    with pytest.raises(ValueError):
        stream.read()


def test_argument_errors(http_server, sleeps):
    url = http_server.add('/img', DATA)
    with pytest.raises(ValueError):
        fetch(url, sleeps, hash_algorithms=('nosuchhash',))
    with pytest.raises(ValueError):
        fetch(url, sleeps, headers={'range': 'bytes=0-1'})
    assert http_server.requests == []


def test_missing_requests_is_reported_only_for_http(monkeypatch, tmp_path):
    monkeypatch.setattr(dl, 'HAS_REQUESTS', False)
    monkeypatch.setattr(dl, 'REQUESTS_IMPORT_ERROR', ImportError('No module named requests'))
    with pytest.raises(MissingLibraryError) as info:
        dl.open_download('https://u:pw@example.invalid/img')
    assert info.value.kind == 'missing_library'
    assert str(info.value) == (
        "the Python library 'requests' is required on the target host to download https://example.invalid/img "
        "(Debian/Ubuntu: apt install python3-requests, or pip install requests): No module named requests")
    path = tmp_path / 'f'
    path.write_bytes(b'abc')
    with dl.open_download(str(path)) as stream:
        assert stream.read() == b'abc'


def test_module_imports_without_requests():
    root = dl.__file__.partition(os.sep + 'ansible_collections' + os.sep)[0]
    code = ('import sys; sys.modules["requests"] = None; sys.path.insert(0, %r)\n'
            'from ansible_collections.vmimage.qemu.plugins.module_utils._transfer import download\n'
            'assert not download.HAS_REQUESTS\n'
            'try:\n'
            '    download.open_download("http://127.0.0.1:9/x")\n'
            'except Exception as e:\n'
            '    print(e.kind, e)\n' % root)
    out = subprocess.run([sys.executable, '-c', code], check=True, stdout=subprocess.PIPE,
                         universal_newlines=True).stdout
    assert out.startswith("missing_library the Python library 'requests' is required on the target host")
    assert 'apt install python3-requests' in out and 'pip install requests' in out


# -- the test server itself ------------------------------------------------

def test_server_stops_cleanly_with_open_connections():
    before = set(threading.enumerate())
    with LocalHTTPServer() as server:
        assert server.url.startswith('http://127.0.0.1:')
        url = server.add('/slow', DATA, slow=1000)
        idle = server.add('/idle', b'x')
        session = requests.Session()
        assert session.get(idle).content == b'x'   # leaves a keep-alive connection
        resp = requests.get(url, stream=True, timeout=5)
        resp.raw.read(10)                          # a transfer in progress
    assert set(threading.enumerate()) - before == set()
    resp.close()
    session.close()


def test_server_range_handling(http_server):
    url = http_server.add('/d', b'0123456789')
    for header, status, body in (('bytes=2-4', 206, b'234'), ('bytes=7-', 206, b'789'),
                                 ('bytes=-3', 206, b'789'), ('bytes=20-', 416, None),
                                 ('bytes=0-1,3-4', 200, b'0123456789')):
        resp = requests.get(url, headers={'Range': header}, timeout=5)
        assert resp.status_code == status
        if body is not None:
            assert resp.content == body
    assert resp.headers['Accept-Ranges'] == 'bytes' and resp.headers['ETag']


def test_server_script_serves_a_directory(tmp_path):
    root = tmp_path / 'root'
    root.mkdir()
    (root / 'a.bin').write_bytes(b'hello')
    (tmp_path / 'secret').write_bytes(b'outside')
    script = os.path.join(REPO, 'tests', 'support', 'http_server.py')
    proc = subprocess.Popen([sys.executable, script, '--port', '0', '--dir', str(root)],
                            stdout=subprocess.PIPE, universal_newlines=True)
    try:
        base = proc.stdout.readline().strip()
        assert base.startswith('http://127.0.0.1:') and base.endswith('/')
        assert requests.get(base + 'a.bin', timeout=5).content == b'hello'
        # http.client sends the path as written (requests would normalise it).
        conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=5)
        conn.request('GET', '/../secret')
        assert conn.getresponse().status == 404
        conn.close()
    finally:
        proc.terminate()
        proc.stdout.close()
        assert proc.wait(timeout=10) == 0
