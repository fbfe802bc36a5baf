# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Streaming downloads with retries, resume, hashing and a size bound.

``open_download()`` returns a read-only file-like ``DownloadStream`` that the
image store feeds straight into its zstd/tar extractor, so an archive is never
written to disk whole.  While the caller reads, the stream

* hashes exactly the bytes it returns (one pass, no second read of the data);
* retries transport errors, HTTP 5xx, 408 and 429 with exponential backoff
  (``backoff_base * 2**(n-1)`` +-25 % jitter, capped at ``backoff_max``,
  ``Retry-After`` honoured), which the original fetcher counted but never slept;
* resumes a dropped transfer with ``Range``/``If-Range`` so only the missing
  tail is fetched again, or, when the server cannot resume, restarts from
  byte 0 and tells the caller (``DownloadRestartRequired``, a control-flow
  signal: callers start over at most ``MAX_RESTARTS`` times, then report
  ``restarts_exhausted()``, a plain DownloadError);
* refuses to deliver more than ``max_bytes`` (``DownloadTooLargeError``);
* always closes its HTTP responses;
* never shows credentials: ``source``, error messages and log lines carry the
  URL without its userinfo (see ``redact_url``);
* keeps credentials with their origin (scheme, host and port): user name and
  password, URL userinfo and the extra headers go only to the origin they were
  given for, redirects are followed by the stream itself so that a hop to
  another origin sends none of them, and Basic auth is only sent once that
  origin asked for it with a 401 challenge (or ``force_basic_auth``).

``http://``, ``https://`` and ``file://`` URLs and absolute local paths are
accepted; local files get the same hashing and size bound.

Only ``requests`` is needed on the target, and only for HTTP(S): importing this
module without it works, and an HTTP download then fails with a
MissingLibraryError that names the library and its packages.

Option values that cannot work (negative retries, a non-positive timeout, a
Range header, a client key without its certificate) raise InvalidOptionError
naming the option.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import abc
import base64
import datetime
import email.utils
import hashlib
import os
import random
import re
import stat
import time

from http.client import HTTPException as _HTTPException
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from ansible_collections.vmimage.qemu.plugins.module_utils._transfer.secrets import is_secret_header  # noqa: F401
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    DownloadError,
    InvalidOptionError,
    LimitExceededError,
    missing_library,
)

try:
    import requests
    import requests.auth
    import requests.exceptions
    import requests.structures
    import requests.utils
    import urllib3.exceptions
except ImportError as _exc:  # pragma: no cover - exercised only on bare targets
    requests = None
    urllib3 = None
    REQUESTS_IMPORT_ERROR = _exc
else:
    REQUESTS_IMPORT_ERROR = None

HAS_REQUESTS = REQUESTS_IMPORT_ERROR is None

# Upper bound of one read from the network or a file: keeps memory flat however
# large the image, while being big enough that per-call overhead is negligible.
CHUNK_SIZE = 1024 * 1024

RETRY_STATUSES = frozenset([408, 429])
REDIRECT_STATUSES = frozenset([301, 302, 303, 307, 308])

# As many hops as urllib (and so get_url) follows; a longer chain is a loop.
MAX_REDIRECTS = 10

# galaxy.yml's version (a test keeps the two equal): servers and their logs
# see which client asked, not a generic python-requests.
COLLECTION_VERSION = '0.1.0'
DEFAULT_HTTP_AGENT = 'vmimage.qemu/' + COLLECTION_VERSION

# The keys a mirror given as a dict may have (see check_mirrors).
MIRROR_KEYS = ('url', 'url_username', 'url_password', 'headers')

_BASIC_CHALLENGE_RE = re.compile(r'(?i)(?:^|[\s,])basic(?:\s|,|$)')
_DEFAULT_PORTS = {'http': 80, 'https': 443}

# How many times a reader starts over from byte 0 (DownloadRestartRequired)
# before giving up: a server that cannot resume and keeps dropping the
# connection would otherwise be downloaded from the start forever.
MAX_RESTARTS = 3

__all__ = [
    'CHUNK_SIZE', 'COLLECTION_VERSION', 'DEFAULT_HTTP_AGENT', 'DownloadStream', 'DownloadRestartRequired',
    'DownloadTooLargeError', 'HAS_REQUESTS', 'MAX_REDIRECTS', 'MAX_RESTARTS', 'MIRROR_KEYS', 'check_mirrors',
    'fetch_first', 'is_secret_header', 'open_download', 'origin_of', 'read_all', 'redact_url',
    'restarts_exhausted',
]


class DownloadRestartRequired(DownloadError):
    """The transfer could not be resumed and starts again from byte 0.

    Raised by ``DownloadStream.read()``.  The stream has already reset its
    counters and hashes; the caller discards whatever it derived from the bytes
    read so far and calls ``read()`` again on the same stream.

    A signal between the stream and its reader, never a result: readers stop
    after ``MAX_RESTARTS`` and raise ``restarts_exhausted()`` instead.  It has
    no kind of its own, so should one escape it still reads as a download
    failure.  ``url`` is the source (redacted), ``reason`` why it could not
    resume.
    """


class DownloadTooLargeError(LimitExceededError, DownloadError):
    """The content is larger than ``max_bytes``.

    Both a LimitExceededError (``kind`` 'limit_exceeded', the class of failure
    an operator acts on: raise the limit or fix the URL) and a DownloadError
    (so code that handles "the download failed" catches it too).
    """


# Matches the userinfo of every URL in a text.  Greedy up to the last '@'
# before the path, so a password holding an unencoded '@' is removed whole.
_USERINFO_RE = re.compile(r'(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@')
_CONTENT_RANGE_RE = re.compile(r'^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$', re.IGNORECASE)


def redact_url(url):
    """Return ``url`` without its userinfo (``user:password@``).

    Works on any text, so it also cleans error messages that quote URLs, and
    never raises on malformed input.  Query strings are left alone on purpose:
    most carry meaning the operator needs to see (mirror selection, versions)
    and there is no reliable way to tell a token from a parameter.  Pre-signed
    URLs whose query is a secret must therefore not be logged by the caller.
    """
    if url is None:
        return None
    return _USERINFO_RE.sub(r'\1', str(url))


def _split_userinfo(url):
    """Return (url without userinfo, username or None, password or None)."""
    parts = urlsplit(url)
    if '@' not in parts.netloc:
        return url, None, None
    userinfo, dummy, hostport = parts.netloc.rpartition('@')
    user, colon, password = userinfo.partition(':')
    clean = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return clean, unquote(user), (unquote(password) if colon else None)


def origin_of(url):
    """``scheme://host:port`` of an http(s) URL, lowercase and with the default
    port written out (so ``https://H/`` and ``https://h:443/`` are one origin);
    None for other URLs and for ones that do not parse."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            return None
        port = parts.port or _DEFAULT_PORTS[scheme]
    except (TypeError, ValueError, AttributeError):
        return None
    host = parts.hostname
    if ':' in host:
        host = '[%s]' % host
    return '%s://%s:%d' % (scheme, host, port)


def check_mirrors(mirrors):
    """The mirror entries as fetch_first() takes them, checked.

    An entry is a URL string, which gets the primary URL's credentials only
    when it is on the same origin, or a dict with ``url`` and optionally its own
    ``url_username``, ``url_password`` and ``headers``, which gets exactly those.
    Anything else raises InvalidOptionError naming the entry (never its values:
    they may hold a password).
    """
    if mirrors is None:
        return []
    if isinstance(mirrors, (str, dict)) or not isinstance(mirrors, (list, tuple)):
        raise InvalidOptionError('mirrors must be a list of URLs or of dicts with url (and optionally '
                                 'url_username, url_password, headers), got a %s' % type(mirrors).__name__)
    checked = []
    for index, entry in enumerate(mirrors):
        what = 'mirrors[%d]' % index
        if isinstance(entry, str):
            if not entry:
                raise InvalidOptionError('%s is an empty URL' % what)
            checked.append(entry)
            continue
        if not isinstance(entry, dict):
            raise InvalidOptionError('%s must be a URL or a dict with url (and optionally url_username, '
                                     'url_password, headers), got a %s' % (what, type(entry).__name__))
        unknown = sorted(str(k) for k in entry if k not in MIRROR_KEYS)
        if unknown:
            raise InvalidOptionError('%s has unknown keys %s; a mirror dict takes %s'
                                     % (what, ', '.join(unknown), ', '.join(MIRROR_KEYS)))
        if not isinstance(entry.get('url'), str) or not entry['url']:
            raise InvalidOptionError('%s needs url, the URL of the mirror (a non-empty string)' % what)
        for key in ('url_username', 'url_password'):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise InvalidOptionError('%s: %s must be a string, got a %s'
                                         % (what, key, type(entry[key]).__name__))
        headers = entry.get('headers')
        if headers is not None and not isinstance(headers, dict):
            raise InvalidOptionError('%s: headers must be a dict of header names and values, got a %s'
                                     % (what, type(headers).__name__))
        checked.append(dict((key, entry.get(key)) for key in MIRROR_KEYS))
    return checked


def _secret_forms(values):
    """The texts under which secret values may turn up in a message: as given,
    stripped, and escaped the way repr() quotes them (requests' InvalidHeader)."""
    forms = set()
    for value in values:
        if value is None:
            continue
        value = str(value)
        forms.update((value, value.strip(), repr(value)[1:-1]))
    # Longest first, so that a secret holding another is masked whole.
    return sorted((f for f in forms if f), key=len, reverse=True)


def _basic_auth_value(user, password):
    token = base64.b64encode(('%s:%s' % (user, password or '')).encode('utf-8'))
    return 'Basic ' + token.decode('ascii')


def _new_hashes(algorithms):
    hashes = {}
    for name in algorithms:
        name = str(name).lower()
        try:
            try:
                # md5/sha1 are only here for checksum compatibility; asking
                # for them this way keeps them usable on FIPS hosts.
                hashes[name] = hashlib.new(name, usedforsecurity=False)
            except TypeError:  # pragma: no cover - interpreters without the keyword
                hashes[name] = hashlib.new(name)
        except ValueError:
            raise ValueError('unsupported hash algorithm %r' % (name,))
    return hashes


def _parse_retry_after(value):
    """Seconds to wait from a Retry-After header (seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def _strong_validator(headers):
    """The validator usable in If-Range: a strong ETag, else Last-Modified.

    RFC 9110 forbids weak ETags in If-Range, so a W/ tag is no validator.
    """
    etag = headers.get('ETag')
    if etag and not etag.strip().startswith('W/'):
        return etag.strip()
    modified = headers.get('Last-Modified')
    return modified.strip() if modified else None


def _int_header(value):
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def restarts_exhausted(source, restarts, last=None):
    """The DownloadError that ends a download restarted ``restarts`` times.

    ``last`` is the final DownloadRestartRequired, whose reason is quoted.
    """
    reason = ('the server could not resume the interrupted transfer, and the download was restarted from '
              'byte 0 %d times, the most allowed' % restarts)
    detail = getattr(last, 'reason', None)
    if detail:
        reason += ' (last: %s)' % detail
    return _download_error(source, reason, attempts=getattr(last, 'attempts', None))


def read_all(stream, max_restarts=MAX_RESTARTS):
    """The whole content of ``stream`` (a small file: it is held in memory),
    starting over when the stream restarts, at most ``max_restarts`` times."""
    restarts = 0
    while True:
        try:
            return stream.read()
        except DownloadRestartRequired as exc:
            restarts += 1
            if restarts > max_restarts:
                stream.close()
                raise restarts_exhausted(stream.source, max_restarts, exc)


def _download_error(source, reason, status=None, attempts=None):
    """A DownloadError whose parts are also attributes (for fetch_first and callers)."""
    exc = DownloadError('download of %s failed: %s' % (source, reason))
    exc.url = source
    exc.reason = reason
    exc.status = status
    exc.attempts = attempts
    return exc


def _local_path(url):
    """The local path ``url`` names (file:// URL or absolute path), or None."""
    if url.startswith('/'):
        return url
    parts = urlsplit(url)
    if parts.scheme.lower() != 'file':
        return None
    if parts.netloc not in ('', 'localhost'):
        raise _download_error(redact_url(url), 'file URLs must name a local file (file:///path)')
    return unquote(parts.path)


class DownloadStream(abc.ABC):
    """Read-only binary file-like over a download; create it with ``open_download()``.

    ``read(n)`` returns exactly ``n`` bytes unless the end was reached
    (``b''`` then), ``readinto(buf)`` fills ``buf`` likewise.  Attributes:

    bytes_read   bytes returned so far (and hashed)
    source       URL or path, without credentials
    total_size   full size from Content-Length / Content-Range / stat, or None
    attempts     HTTP requests made (1 for local files)
    resumed      successful Range resumes
    restarts     times the transfer started again from byte 0

    ``hexdigest(algo)`` is the digest of the bytes returned so far for each of
    ``hash_algorithms``; after ``read()`` returned ``b''`` it is the digest of
    the whole content.

    Restart contract.  When a connection drops, the stream asks the server
    for the rest (``Range: bytes=<bytes_read>-`` with ``If-Range``) and, if
    the answer continues exactly where it stopped, ``read()`` just goes on.
    When it cannot (the server ignores Range, the content changed, the
    Content-Range does not fit), ``read()`` raises ``DownloadRestartRequired``
    after resetting ``bytes_read`` and the hashes to zero.  The caller then
    throws away everything it built from the earlier bytes (a partial
    extraction) and calls ``read()`` again on the same stream, which returns
    the content from byte 0 (from the full response it already has: nothing is
    requested twice).  A caller that cannot start over just lets the exception
    propagate: it is a DownloadError.

    Any other DownloadError (including DownloadTooLargeError) is final and
    closes the stream.  Streams are context managers; ``close()`` releases the
    connection at any time.
    """

    def __init__(self, source, hash_algorithms=('sha256',), max_bytes=None, logger=None):
        self.source = source
        self.bytes_read = 0
        self.total_size = None
        self.attempts = 0
        self.resumed = 0
        self.restarts = 0
        self._algorithms = tuple(str(a).lower() for a in hash_algorithms)
        self._hashes = _new_hashes(self._algorithms)
        self._max_bytes = max_bytes
        self._logger = logger
        self._eof = False
        self._closed = False

    # -- file-like API -------------------------------------------------

    @property
    def closed(self):
        return self._closed

    def readable(self):
        return True

    def seekable(self):
        return False

    def writable(self):
        return False

    def read(self, n=-1):
        self._check_open()
        if n is None or n < 0:
            n = None
        parts = []
        got = 0
        try:
            while n is None or got < n:
                chunk = self._read_some(CHUNK_SIZE if n is None else min(n - got, CHUNK_SIZE))
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        except DownloadRestartRequired:
            raise
        except DownloadError:
            # A final failure: release the connection now rather than when
            # the caller gets round to closing.
            self.close()
            raise
        return b''.join(parts)

    def readinto(self, buf):
        view = memoryview(buf).cast('B')
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)

    def hexdigest(self, algo):
        """Hex digest (lowercase) of the bytes returned so far."""
        try:
            return self._hashes[str(algo).lower()].hexdigest()
        except KeyError:
            raise ValueError('%s was not computed for %s (hash_algorithms=%r)'
                             % (algo, self.source, self._algorithms))

    def close(self):
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return '<%s %s %d bytes read>' % (type(self).__name__, self.source, self.bytes_read)

    # -- shared machinery ----------------------------------------------

    def _check_open(self):
        if self._closed:
            raise ValueError('I/O operation on closed download stream (%s)' % self.source)

    def _read_some(self, n):
        """One chunk of at most n bytes (b'' at the end), checked and hashed."""
        if self._eof:
            return b''
        limit = n
        if self._max_bytes is not None:
            # One byte more than allowed is enough to tell an oversized body
            # on the very read that would exceed the limit.
            limit = min(n, self._max_bytes - self.bytes_read + 1)
        chunk = self._next_chunk(limit)
        if not chunk:
            self._eof = True
            self._release()
            return b''
        if self._max_bytes is not None and self.bytes_read + len(chunk) > self._max_bytes:
            raise self._too_large()
        for digest in self._hashes.values():
            digest.update(chunk)
        self.bytes_read += len(chunk)
        return chunk

    def _reset(self):
        self.bytes_read = 0
        self._hashes = _new_hashes(self._algorithms)

    def _too_large(self, size=None):
        what = 'is %d bytes' % size if size is not None else 'has more bytes'
        return DownloadTooLargeError('%s %s, more than the limit of %d bytes'
                                     % (self.source, what, self._max_bytes))

    def _check_declared_size(self):
        # Fail before reading anything when the size is announced up front.
        if self._max_bytes is not None and self.total_size is not None \
                and self.total_size > self._max_bytes:
            raise self._too_large(self.total_size)

    def _log(self, msg):
        if self._logger is None:
            return
        if hasattr(self._logger, 'warning'):
            self._logger.warning(msg)
        else:
            self._logger(msg)

    @abc.abstractmethod
    def _next_chunk(self, n):
        """Return up to ``n`` more bytes of the body (b'' at its end)."""

    @abc.abstractmethod
    def _release(self):
        """Close what the stream holds (file, response, session)."""


class _FileStream(DownloadStream):
    """A local file: no retries, same hashing and size bound."""

    def __init__(self, path, source, **kw):
        super(_FileStream, self).__init__(source, **kw)
        self.attempts = 1
        self._file = None
        try:
            # Checked before opening: opening a FIFO would block forever.
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise _download_error(source, 'not a regular file')
            self._file = open(path, 'rb')
            self.total_size = os.fstat(self._file.fileno()).st_size
        except OSError as exc:
            self._release()
            raise _download_error(source, exc.strerror or str(exc))
        try:
            self._check_declared_size()
        except DownloadError:
            self._release()
            raise

    def _next_chunk(self, n):
        try:
            return self._file.read(n)
        except OSError as exc:
            raise _download_error(self.source, exc.strerror or str(exc))

    def _release(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class _Access(object):
    """What each request may carry, by the origin it goes to.

    The extra headers belong to one origin (``owner``: where they were given
    for) and credentials to theirs (``credentials``: origin -> (user,
    password)); a request to any other origin, first or after a redirect,
    carries neither.  Basic auth is added only for an origin that answered
    401 with a Basic challenge (remembered for the resumes that follow), or
    at once with ``force``: sending a password before the server asked for one
    hands it to whatever answers at that address.
    """

    def __init__(self, base_headers, owner, headers, credentials, force, use_netrc, unredirected, secrets):
        self.base_headers = base_headers
        self.owner = owner
        self.headers = headers
        self.credentials = credentials
        self.force = force
        self.use_netrc = use_netrc
        self.unredirected = unredirected
        self.secrets = secrets
        self.challenged = set()

    def credentials_for(self, url):
        origin = origin_of(url)
        if origin not in self.credentials and self.use_netrc:
            # requests looks the host up in ~/.netrc (or $NETRC) itself: the
            # entry is that host's own, so it stays with it after a redirect.
            found = requests.utils.get_netrc_auth(url)
            self.credentials[origin] = found or None
            if found:
                self.secrets.extend(_secret_forms([found[1]]))
        return self.credentials.get(origin)

    def headers_for(self, url, redirected):
        headers = requests.structures.CaseInsensitiveDict(self.base_headers)
        origin = origin_of(url)
        if origin == self.owner:
            headers.update(self.headers)
        # An Authorization header given by the caller (a token) wins over Basic.
        if 'Authorization' not in headers and (self.force or origin in self.challenged):
            found = self.credentials_for(url)
            if found:
                headers['Authorization'] = _basic_auth_value(*found)
        if redirected:
            # None also removes what requests would add by itself.
            for name in self.unredirected:
                headers[name] = None
        return headers

    def may_answer_challenge(self, url, resp):
        """True (and remembered) when a 401 asks for Basic auth that we can give and did not send."""
        origin = origin_of(url)
        if origin in self.challenged or self.force:
            return False
        if not _BASIC_CHALLENGE_RE.search(resp.headers.get('WWW-Authenticate') or ''):
            return False
        if origin == self.owner and 'Authorization' in requests.structures.CaseInsensitiveDict(self.headers):
            return False
        if not self.credentials_for(url):
            return False
        self.challenged.add(origin)
        return True

    def sent_credentials(self, url):
        origin = origin_of(url)
        if origin == self.owner and 'Authorization' in requests.structures.CaseInsensitiveDict(self.headers):
            return True
        return (self.force or origin in self.challenged) and bool(self.credentials.get(origin))


def _no_environment_auth(request):
    """Given as ``auth`` so that requests adds no credentials of its own: it
    would send ~/.netrc's at once, before any challenge (_Access decides)."""
    return request


class _HttpStream(DownloadStream):
    """HTTP(S) with retries, Range resume and restart (see DownloadStream)."""

    def __init__(self, url, source, session, request_kw, access, retries, backoff_base,
                 backoff_max, sleep, **kw):
        super(_HttpStream, self).__init__(source, **kw)
        self._url = url
        self._session = session
        self._request_kw = request_kw
        self._access = access
        self._secrets = access.secrets
        self._retries = retries
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._sleep = sleep
        self._resp = None
        self._validator = None
        # Set when a resume answer could not be trusted: ask for the whole body.
        self._want_full = False
        # Failures since the last new byte: a flaky link that keeps making
        # progress is not given up on, a server that never does is.
        self._failures = 0
        self._high_water = 0

    # -- reading -------------------------------------------------------

    def _next_chunk(self, n):
        while True:
            if self._resp is None:
                self._connect()
            try:
                chunk = self._resp.raw.read(n, decode_content=False)
            except _transport_errors() as exc:
                self._drop('connection lost after %d bytes (%s)' % (self.bytes_read, self._describe(exc)))
                continue
            if chunk:
                if self.bytes_read + len(chunk) > self._high_water:
                    self._high_water = self.bytes_read + len(chunk)
                    self._failures = 0
                return chunk
            if self.total_size is not None and self.bytes_read < self.total_size:
                # urllib3 notices most short bodies itself; this covers the rest.
                self._drop('connection closed after %d of %d bytes' % (self.bytes_read, self.total_size))
                continue
            return b''

    def _drop(self, reason):
        self._close_response()
        self._retry_or_fail(reason)

    # -- connecting ----------------------------------------------------

    def _connect(self):
        """Get a response whose body continues at bytes_read (or restart)."""
        while True:
            offset = self.bytes_read
            headers = {}
            ranged = offset > 0 and self._validator is not None and not self._want_full
            if ranged:
                headers['Range'] = 'bytes=%d-' % offset
                headers['If-Range'] = self._validator
            self.attempts += 1
            try:
                resp, url = self._request(headers)
            except _fatal_request_errors() as exc:
                raise self._error(self._describe(exc))
            except _transport_errors() as exc:
                self._retry_or_fail(self._describe(exc))
                continue
            status = resp.status_code
            if status in RETRY_STATUSES or 500 <= status <= 599:
                retry_after = _parse_retry_after(resp.headers.get('Retry-After'))
                resp.close()
                self._retry_or_fail(self._status_text(resp), retry_after)
                continue
            if status == 401:
                resp.close()
                raise self._error(self._unauthorized(url, resp), status=status)
            if status not in (200, 206):
                resp.close()
                raise self._error(self._status_text(resp), status=status)
            start, total, problem = self._body_start(resp)
            if problem is None and start not in (offset, 0):
                problem = 'the server resumed at byte %d instead of %d' % (start, offset)
            if problem is not None:
                resp.close()
                self._want_full = True
                self._retry_or_fail(problem)
                continue
            self._resp = resp
            self._want_full = False
            self.total_size = total
            if start == offset:
                if offset:
                    self.resumed += 1
                    self._log('%s: resumed at byte %d' % (self.source, offset))
                else:
                    self._validator = _strong_validator(resp.headers)
                self._check_declared_size()
                return
            # The body starts at byte 0 although bytes were delivered already.
            if ranged:
                why = 'the server sent the whole content instead of the rest'
            elif self._validator is None:
                why = 'the server gave no validator (ETag, Last-Modified) to resume safely'
            else:
                why = 'the server could not continue consistently'
            self._validator = _strong_validator(resp.headers)
            self._check_declared_size()
            self._reset()
            self.restarts += 1
            reason = 'could not resume at byte %d: %s' % (offset, why)
            msg = '%s: %s; the download restarts from byte 0' % (self.source, reason)
            self._log(msg)
            restart = DownloadRestartRequired(msg)
            restart.url = self.source
            restart.reason = reason
            restart.attempts = self.attempts
            raise restart

    def _request(self, extra_headers):
        """(response, its URL) for the stream's URL, after redirects and a Basic challenge.

        Redirects are followed here rather than by requests, which would keep
        sending the extra headers (and netrc credentials) to another origin.
        """
        url = self._url
        redirects = 0
        while True:
            headers = self._access.headers_for(url, redirects > 0)
            headers.update(extra_headers)
            resp = self._session.get(url, headers=headers, stream=True, **self._request_kw)
            location = resp.headers.get('Location')
            if resp.status_code in REDIRECT_STATUSES and location:
                resp.close()
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise self._error('more than %d redirects (last to %s)'
                                      % (MAX_REDIRECTS, redact_url(location)[:200]))
                # Userinfo in a Location is the server's idea, never ours to send.
                url = _split_userinfo(urljoin(url, location.strip()))[0]
                if origin_of(url) is None:
                    raise self._error('redirected to %s, which is not an http:// or https:// URL'
                                      % redact_url(url)[:200])
                continue
            if resp.status_code == 401 and self._access.may_answer_challenge(url, resp):
                resp.close()
                continue
            return resp, url

    def _unauthorized(self, url, resp):
        origin = origin_of(url)
        status = self._status_text(resp)
        if self._access.sent_credentials(url):
            return '%s: %s rejected the credentials' % (status, origin)
        challenge = resp.headers.get('WWW-Authenticate') or ''
        if challenge and not _BASIC_CHALLENGE_RE.search(challenge):
            scheme = ''.join(c for c in challenge.split(None, 1)[0] if c.isprintable())[:40]
            return ('%s: %s asks for %s authentication; only Basic (url_username/url_password) is done here, '
                    'other schemes need their Authorization header in headers' % (status, origin, scheme))
        return ('%s: %s asks for authentication and no credentials were given for it (url_username and '
                'url_password, or user information in the URL; a mirror needs its own)' % (status, origin))

    def _body_start(self, resp):
        """(first byte offset, total size or None, problem or None) of a 200/206."""
        if resp.status_code == 200:
            return 0, _int_header(resp.headers.get('Content-Length')), None
        match = _CONTENT_RANGE_RE.match(resp.headers.get('Content-Range') or '')
        if not match:
            return None, None, 'unusable Content-Range %r' % (resp.headers.get('Content-Range'),)
        start, end = int(match.group(1)), int(match.group(2))
        total = None if match.group(3) == '*' else int(match.group(3))
        if end < start or (total is not None and end + 1 != total):
            return None, None, 'partial Content-Range %r' % resp.headers.get('Content-Range')
        if total is not None and self.total_size is not None and total != self.total_size:
            return None, None, 'size changed from %d to %d bytes' % (self.total_size, total)
        if start and self._validator is not None:
            # A server that ignores If-Range may still send the new content's
            # tail: its validator gives it away.
            # Compare like with like: an ETag with the ETag, a date with Last-Modified.
            is_etag = self._validator.startswith('"')
            current = resp.headers.get('ETag' if is_etag else 'Last-Modified')
            current = current.strip() if current else None
            if current is not None and current != self._validator:
                return None, None, 'content changed (validator %s, was %s)' % (current, self._validator)
        return start, total, None

    # -- failures ------------------------------------------------------

    def _retry_or_fail(self, reason, retry_after=None):
        self._failures += 1
        if self._failures > self._retries:
            raise self._error('%s; gave up after %d attempts' % (reason, self.attempts))
        if retry_after is not None:
            delay = min(retry_after, self._backoff_max)
        else:
            exponent = min(self._failures - 1, 64)
            delay = self._backoff_base * (2 ** exponent) * random.uniform(0.75, 1.25)
            delay = min(delay, self._backoff_max)
        self._log('%s: %s; retry %d of %d in %.2fs'
                  % (self.source, reason, self._failures, self._retries, delay))
        self._sleep(delay)

    def _error(self, reason, status=None):
        return _download_error(self.source, reason, status, self.attempts)

    def _status_text(self, resp):
        # The reason phrase comes from the server: keep it short and printable.
        phrase = ''.join(c for c in (resp.reason or '') if c.isprintable())[:80]
        return ('HTTP %d %s' % (resp.status_code, phrase)).rstrip()

    def _describe(self, exc):
        text = '%s: %s' % (type(exc).__name__, exc)
        text = redact_url(text)
        for secret in self._secrets:
            text = text.replace(secret, '********')
        return text[:400]

    def _close_response(self):
        if self._resp is not None:
            resp, self._resp = self._resp, None
            resp.close()

    def _release(self):
        self._close_response()
        if self._closed and self._session is not None:
            self._session.close()
            self._session = None


def _transport_errors():
    """Exceptions after which another attempt may well succeed."""
    return (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.HTTPError,
        _HTTPException,
        OSError,
    )


def _fatal_request_errors():
    """Exceptions no retry can fix: bad URL or certificate, redirect loop, ...

    SSLError is a ConnectionError in requests, so this is checked first.
    """
    return (
        requests.exceptions.SSLError,
        requests.exceptions.InvalidURL,
        requests.exceptions.InvalidSchema,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidHeader,
        requests.exceptions.TooManyRedirects,
    )


def open_download(url, headers=None, url_username=None, url_password=None, validate_certs=True,
                  ca_path=None, client_cert=None, client_key=None, timeout=30, retries=8,
                  backoff_base=0.2, backoff_max=60.0, hash_algorithms=('sha256',), max_bytes=None,
                  sleep=time.sleep, logger=None, credentials_origin=None, force_basic_auth=False,
                  use_proxy=True, use_netrc=True, http_agent=None, unredirected_headers=None):
    """Open ``url`` for streaming and return a ``DownloadStream``.

    url              http(s)://, file:// or an absolute path; userinfo in the
                     URL is used for basic auth and never shown
    headers          extra request headers (not Range/If-Range: the stream owns them)
    url_username/url_password  HTTP basic auth (override the URL's userinfo)
    credentials_origin  the URL that headers, url_username/url_password (and
                     its own userinfo) were given for: they are sent only to
                     its origin (scheme, host, port).  Default: ``url``.  A
                     mirror or a checksum file names the primary URL here, so
                     it gets them only when it is on the same origin.
    force_basic_auth send Basic auth with the first request instead of
                     waiting for the server's 401 challenge
    use_proxy        False ignores the *_proxy environment variables
    use_netrc        False ignores ~/.netrc (or $NETRC); its entries are per
                     host and used, like other credentials, on a challenge
    http_agent       User-Agent (default DEFAULT_HTTP_AGENT)
    unredirected_headers  header names (any case) not sent after a redirect
    validate_certs/ca_path     TLS verification; ca_path a CA bundle file or dir
    client_cert/client_key     TLS client certificate (key may be inside cert)
    timeout          seconds for connect and for each read (or a (connect, read) tuple)
    retries          retries after the first attempt (counted since the last progress)
    backoff_base/backoff_max   retry delays: base * 2**(n-1) +-25 %, at most max
    hash_algorithms  hashlib names computed while streaming (hexdigest())
    max_bytes        fail with DownloadTooLargeError past this many bytes
    sleep            called with each delay (tests record instead of sleeping)
    logger           logging.Logger-like (``.warning``) or callable(msg) for
                     retry/resume/restart notes; None for silence

    The first request is made here, so a missing file, a 404, a 401 or a
    refused connection (after retries) raises DownloadError from this call.
    Redirects (at most MAX_REDIRECTS) are followed to http(s) URLs only.
    Proxies come from the environment as in requests (``*_proxy``,
    ``no_proxy``) unless ``use_proxy`` is False.
    """
    if not isinstance(url, str) or not url:
        raise InvalidOptionError('url must be a non-empty string (http://, https://, file:// or an absolute path), '
                                 'got %r' % (url,))
    if max_bytes is not None and max_bytes < 0:
        raise ValueError('max_bytes must not be negative')
    if retries < 0:
        raise InvalidOptionError('retries must be 0 or more, got %d' % retries)
    for value in (timeout if isinstance(timeout, (tuple, list)) else (timeout,)):
        if value is not None and value <= 0:
            raise InvalidOptionError('timeout must be a positive number of seconds, got %r' % (value,))
    stream_kw = dict(hash_algorithms=hash_algorithms, max_bytes=max_bytes, logger=logger)
    _new_hashes(hash_algorithms)  # reject an unknown algorithm before any I/O

    try:
        path = _local_path(url)
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:  # e.g. a malformed IPv6 host
        raise _download_error(redact_url(url), 'invalid URL (%s)' % redact_url(str(exc)))
    if path is not None:
        return _FileStream(path, redact_url(url), **stream_kw)

    source = redact_url(url)
    if scheme not in ('http', 'https'):
        raise _download_error(source, 'only http://, https://, file:// URLs and absolute paths '
                              'are supported')
    if not HAS_REQUESTS:
        raise missing_library('requests', 'python3-requests', 'requests', REQUESTS_IMPORT_ERROR,
                              purpose='to download %s' % source)

    headers = dict(headers or {})
    for name in headers:
        if name.lower() in ('range', 'if-range'):
            raise InvalidOptionError('headers: %s is managed by the download itself (resume); leave it out'
                                     % name)
    unredirected = []
    for name in unredirected_headers or ():
        if not isinstance(name, str) or not name:
            raise InvalidOptionError('unredirected_headers must be header names, got %r' % (name,))
        unredirected.append(name)
    # The raw bytes are what Range offsets, Content-Length and the published
    # checksum refer to: ask servers not to compress them on the fly.
    base_headers = {'Accept-Encoding': 'identity',
                    'User-Agent': DEFAULT_HTTP_AGENT if http_agent is None else http_agent}

    clean_url, own_user, own_password = _split_userinfo(url)
    target = origin_of(clean_url)
    if target is None:
        raise _download_error(source, 'invalid URL (no host)')
    owner = target
    user = password = None
    if credentials_origin is not None:
        owner = origin_of(credentials_origin)
        if owner is not None:
            dummy, user, password = _split_userinfo(credentials_origin)
    credentials = {}
    if own_user is not None:
        credentials[target] = (own_user, own_password)
    if owner == target and own_user is not None:
        user, password = own_user, (own_password if own_password is not None else password)
    if url_username is not None:
        user = url_username
    if url_password is not None:
        password = url_password
    if user is not None:
        credentials[owner] = (user, password or '')
    secrets = _secret_forms([password, own_password] + [v for k, v in headers.items() if is_secret_header(k)])
    access = _Access(base_headers, owner, headers, credentials, force_basic_auth, use_netrc, unredirected,
                     secrets)

    if validate_certs:
        verify = ca_path if ca_path else True
    else:
        verify = False
    if client_key and not client_cert:
        raise InvalidOptionError('client_key needs client_cert: give the certificate that goes with the key '
                                 '(or a client_cert file holding both)')
    cert = (client_cert, client_key) if client_key else client_cert
    if not isinstance(timeout, (tuple, list)):
        timeout = (timeout, timeout)

    session = requests.Session()
    request_kw = dict(timeout=tuple(timeout), verify=verify, cert=cert, auth=_no_environment_auth,
                      allow_redirects=False)
    if not use_proxy:
        # requests fills in only the schemes left unset and then drops the
        # None ones: no proxy at all, while the rest of the environment
        # (REQUESTS_CA_BUNDLE) still counts.
        request_kw['proxies'] = dict.fromkeys(('http', 'https', 'all'), None)
    stream = _HttpStream(clean_url, source, session, request_kw, access, retries, backoff_base,
                         backoff_max, sleep, **stream_kw)
    try:
        stream._connect()  # the first request happens here, so a 404 fails the open
    except BaseException:
        stream.close()
        raise
    return stream


def fetch_first(urls, **kw):
    """Open the first of ``urls`` that answers; keyword arguments as open_download().

    Put mirrors first and the primary URL last.  An entry is a URL or a dict
    from check_mirrors(): a dict is opened with its own url_username,
    url_password and headers only; a URL with the keyword ones, which belong
    to ``credentials_origin`` (default: the last entry, the primary), so a
    mirror on another origin gets none.  Each URL gets its own retries; one
    that still fails moves on to the next.  Once a stream is returned it stays
    on that URL (resume and restart included): switching hosts mid-body would
    splice two copies.  When all fail, the DownloadError lists every URL tried
    (redacted) with its reason; with a single URL its own error is raised.
    """
    if isinstance(urls, (str, dict)):
        urls = [urls]
    urls = check_mirrors(list(urls))
    if not urls:
        raise ValueError('fetch_first needs at least one URL')
    if kw.get('credentials_origin') is None:
        last = urls[-1]
        kw['credentials_origin'] = last['url'] if isinstance(last, dict) else last
    logger = kw.get('logger')
    own_kw = dict((k, v) for k, v in kw.items() if k not in MIRROR_KEYS and k != 'credentials_origin')
    failures = []
    for entry in urls:
        if isinstance(entry, dict):
            url = entry['url']
            entry_kw = dict(own_kw, url_username=entry['url_username'], url_password=entry['url_password'],
                            headers=entry['headers'])
        else:
            url, entry_kw = entry, kw
        try:
            return open_download(url, **entry_kw)
        except DownloadError as exc:
            if len(urls) == 1:
                raise
            reason = getattr(exc, 'reason', None) or str(exc)
            failures.append((redact_url(url), reason))
            if logger is not None:
                msg = '%s failed (%s), trying the next source' % (redact_url(url), reason)
                if hasattr(logger, 'warning'):
                    logger.warning(msg)
                else:
                    logger(msg)
    exc = DownloadError('all %d sources failed: %s'
                        % (len(failures), '; '.join('%s: %s' % f for f in failures)))
    exc.failures = failures
    raise exc
