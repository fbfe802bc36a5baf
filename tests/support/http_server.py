# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A real HTTP/1.1 server on 127.0.0.1 with fault injection, for tests and benchmarks.

    from support.http_server import LocalHTTPServer

    with LocalHTTPServer() as srv:
        url = srv.add('/img.tar.zst', data, cut_after=4096)   # returns the full URL
        ...
        assert [r.range for r in srv.requests_for('/img.tar.zst')] == [None, 'bytes=4096-']

As a pytest fixture, ``http_server`` here can be enabled with
``pytest_plugins = ['support.http_server']`` in the root conftest; a test
module that also imports this module defines its own three-line fixture
instead (pytest warns when a plugin module was imported before).

Paths serve registered bytes or files (``add``), or files under ``root``.
GET and HEAD; a single byte range (``bytes=a-b``, ``a-``, ``-n``) gets a 206
with Content-Range, honouring If-Range; every content response carries
Accept-Ranges, ETag and Last-Modified.  Faults, per path (counters count
requests to that path, in order; each fault's budget is used up only by the
requests it actually hit):

    status=404                always answer this status (with ``headers``, e.g.
                              status=302, headers={'Location': url} for a redirect)
    auth=('user', 'pw')       basic auth required (401 otherwise)
    fail_first=N, fail_status=503      the first N requests get fail_status
    retry_after=S, retry_after_first=1 the first N requests get 429, Retry-After: S
    cut_after=B, cut_first=1  the first N bodies stop after B bytes and the
                              connection is closed (full Content-Length declared)
    slow=BPS, slow_first=None throttle bodies to BPS bytes/s (None: every request)
    no_range=True             ignore Range: always 200 with the whole content
    ignore_if_range=True      honour Range even when If-Range no longer matches
    change_etag_after=N       after N content responses the validators
                              (ETag, Last-Modified) change, and the content
                              becomes ``new_data`` if given
    chunked=True              Transfer-Encoding: chunked, no Content-Length
    etag=False / last_modified=False   leave that validator out

Every request is recorded (``requests``, ``requests_for(path)``) with method,
path, headers, Range, If-Range, status and the body bytes actually sent; reading the
records first waits for requests still being answered, so they are complete.

``LocalHTTPServer(host='127.0.0.2')`` serves on another loopback address: a
second origin for the tests of what crosses from one origin to another (all of
127/8 is loopback on Linux).

Run as a script to serve a directory (for demos and benchmarks):
``python tests/support/http_server.py --port 0 --dir DIR`` prints the base URL.
"""

from __future__ import absolute_import, division, print_function

import argparse
import base64
import email.utils
import hashlib
import os
import signal
import socket
import socketserver
import sys
import threading
import time

from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import ThreadingMixIn
from urllib.parse import quote, unquote, urlsplit

__all__ = ['LocalHTTPServer', 'RecordedRequest', 'http_server']

_FILE_CHUNK = 256 * 1024
_EPOCH = 1700000000  # fixed Last-Modified base: tests get stable validators


class RecordedRequest(object):
    """One request as the server saw and answered it."""

    __slots__ = ('method', 'path', 'range', 'if_range', 'authorization', 'headers', 'status', 'sent',
                 'done')

    def __init__(self, method, path, headers):
        self.method = method
        self.path = path
        self.headers = headers  # {lowercase name: value}
        self.range = headers.get('range')
        self.if_range = headers.get('if-range')
        self.authorization = headers.get('authorization')
        self.status = None
        self.sent = 0  # body bytes written to the socket
        self.done = False

    def __repr__(self):
        return ('RecordedRequest(%s %s range=%r if_range=%r status=%r sent=%d)'
                % (self.method, self.path, self.range, self.if_range, self.status, self.sent))


class _Resource(object):
    """Content and faults of one path."""

    def __init__(self, data=None, file=None, status=None, auth=None, fail_first=0, fail_status=503,
                 retry_after=None, retry_after_first=1, cut_after=None, cut_first=1, slow=None,
                 slow_first=None, no_range=False, ignore_if_range=False, change_etag_after=None,
                 new_data=None, chunked=False, etag=True, last_modified=True, headers=None):
        if (data is None) == (file is None) and status is None:
            raise ValueError('give exactly one of data= or file=')
        self.data = data
        self.file = file
        self.status = status
        self.auth = auth
        self.fail_left = fail_first
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.retry_after_left = retry_after_first if retry_after is not None else 0
        self.cut_after = cut_after
        self.cut_left = cut_first if cut_after is not None else 0
        self.slow = slow
        self.slow_left = slow_first
        self.no_range = no_range
        self.ignore_if_range = ignore_if_range
        self.change_etag_after = change_etag_after
        self.new_data = new_data
        self.chunked = chunked
        self.etag = etag
        self.last_modified = last_modified
        self.headers = dict(headers or {})
        self.served = 0  # content responses so far (drives change_etag_after)
        if file is not None:
            st = os.stat(file)
            self._tag = '%x-%x' % (st.st_mtime_ns, st.st_size)
        elif data is not None:
            self._tag = hashlib.sha256(data).hexdigest()[:16]

    def version(self, generation):
        """(data or None, file or None, size, etag, last_modified) of a generation."""
        data = self.data
        if generation and self.new_data is not None:
            data = self.new_data
        size = len(data) if data is not None else os.path.getsize(self.file)
        etag = '"%s-%d"' % (self._tag, generation) if self.etag else None
        modified = (email.utils.formatdate(_EPOCH + 3600 * generation, usegmt=True)
                    if self.last_modified else None)
        return data, (self.file if data is None else None), size, etag, modified


class _ThreadingServer(ThreadingMixIn, HTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins every handler thread
    allow_reuse_address = True

    def server_bind(self):
        # HTTPServer.server_bind resolves the host name, which can stall on
        # DNS; the name is never used, so skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.server_address[0]
        self.server_port = self.server_address[1]

    def handle_error(self, request, client_address):
        # A client that hangs up (as the download tests make it do) is normal.
        if isinstance(sys.exc_info()[1], OSError):
            return
        HTTPServer.handle_error(self, request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'vmimage-test-http/1'
    # An idle keep-alive connection may wait this long for its next request;
    # stop() does not wait for it (it shuts those sockets down).
    timeout = 30

    def setup(self):
        BaseHTTPRequestHandler.setup(self)
        self.server.owner._track(self.connection, True)

    def finish(self):
        try:
            BaseHTTPRequestHandler.finish(self)
        except OSError:
            pass
        finally:
            self.server.owner._track(self.connection, False)

    def do_GET(self):
        self.server.owner._serve(self, head=False)

    def do_HEAD(self):
        self.server.owner._serve(self, head=True)

    def log_message(self, fmt, *args):
        if self.server.owner.verbose:
            sys.stderr.write('%s - %s\n' % (self.address_string(), fmt % args))


class LocalHTTPServer(object):
    """Threaded HTTP/1.1 server bound to 127.0.0.1 (ephemeral port by default)."""

    def __init__(self, root=None, port=0, verbose=False, host='127.0.0.1'):
        self.root = os.path.realpath(root) if root else None
        self.host = host
        self.verbose = verbose
        self._port = port
        self._resources = {}
        self._records = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._connections = set()
        self._stopping = threading.Event()
        self._server = None
        self._thread = None

    # -- lifecycle -----------------------------------------------------

    def start(self):
        self._server = _ThreadingServer((self.host, self._port), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={'poll_interval': 0.05},
                                        name='LocalHTTPServer')
        self._thread.start()
        return self

    def stop(self):
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._thread.join()
        # Unblock handlers waiting on idle keep-alive connections or sending
        # to a client that stopped reading, so server_close() can join them.
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._server = None
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def port(self):
        return self._server.server_address[1]

    @property
    def url(self):
        """Base URL, without a trailing slash."""
        return 'http://%s:%d' % (self.host, self.port)

    def url_for(self, path, username=None, password=None):
        """Full URL of a path, optionally with userinfo."""
        userinfo = ''
        if username is not None:
            userinfo = quote(username, safe='')
            if password is not None:
                userinfo += ':' + quote(password, safe='')
            userinfo += '@'
        return 'http://%s%s:%d%s' % (userinfo, self.host, self.port, quote(path))

    # -- content and records -------------------------------------------

    def add(self, path, data=None, file=None, **faults):
        """Serve ``data`` (bytes) or ``file`` (a path) at ``path`` with the given faults.

        Returns the full URL.  Adding a path again replaces it (and its counters).
        """
        if not path.startswith('/'):
            raise ValueError('paths start with /')
        resource = _Resource(data=data, file=file, **faults)
        with self._lock:
            self._resources[path] = resource
        return self.url_for(path)

    @property
    def requests(self):
        """Every request so far, in arrival order (waits for those in progress)."""
        self.wait_idle()
        with self._lock:
            return list(self._records)

    def requests_for(self, path):
        return [r for r in self.requests if r.path == path]

    def clear_requests(self):
        self.wait_idle()
        with self._lock:
            del self._records[:]

    def wait_idle(self, timeout=10.0):
        """Wait until no request is being answered; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    # -- request handling (handler threads) ----------------------------

    def _track(self, conn, add):
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _lookup(self, path):
        with self._lock:
            resource = self._resources.get(path)
            if resource is not None or self.root is None:
                return resource
            # Files under root, never outside it.
            full = os.path.realpath(os.path.join(self.root, path.lstrip('/')))
            if os.path.commonpath([full, self.root]) != self.root or not os.path.isfile(full):
                return None
            resource = self._resources[path] = _Resource(file=full)
            return resource

    def _serve(self, handler, head):
        path = unquote(urlsplit(handler.path).path)
        record = RecordedRequest(handler.command, path,
                                 dict((k.lower(), v) for k, v in handler.headers.items()))
        with self._lock:
            self._records.append(record)
            self._active += 1
        try:
            self._respond(handler, head, record)
        except OSError:
            # The client went away (or stop() cut it off): nothing to answer.
            handler.close_connection = True
        finally:
            with self._idle:
                record.done = True
                self._active -= 1
                self._idle.notify_all()

    def _respond(self, handler, head, record):
        resource = self._lookup(record.path)
        if resource is None:
            return self._simple(handler, record, 404)
        if resource.auth is not None:
            expected = 'Basic ' + base64.b64encode(
                ('%s:%s' % resource.auth).encode('utf-8')).decode('ascii')
            if record.authorization != expected:
                return self._simple(handler, record, 401,
                                    {'WWW-Authenticate': 'Basic realm="vmimage-test"'})
        if resource.status is not None:
            return self._simple(handler, record, resource.status, resource.headers)
        # Set for every request although only a delivered body uses them: a
        # fault returns before that, which static checkers cannot follow.
        generation, cut, slow = 0, None, None
        with self._lock:
            if resource.fail_left > 0:
                resource.fail_left -= 1
                fault = ('fail', resource.fail_status)
            elif resource.retry_after_left > 0:
                resource.retry_after_left -= 1
                fault = ('retry_after', resource.retry_after)
            else:
                fault = None
                if resource.change_etag_after is not None and resource.served >= resource.change_etag_after:
                    generation = 1
                resource.served += 1
                cut = resource.cut_after if resource.cut_left > 0 else None
                if cut is not None:
                    resource.cut_left -= 1
                if resource.slow is not None and (resource.slow_left is None or resource.slow_left > 0):
                    slow = resource.slow
                    if resource.slow_left is not None:
                        resource.slow_left -= 1
        if fault is not None and fault[0] == 'fail':
            return self._simple(handler, record, fault[1])
        if fault is not None:
            return self._simple(handler, record, 429, {'Retry-After': str(fault[1])})

        data, file, size, etag, modified = resource.version(generation)
        start, end = 0, size - 1
        status = 200
        wanted = record.range
        if wanted and not resource.no_range and self._if_range_holds(resource, record.if_range, etag, modified):
            parsed = _parse_range(wanted, size)
            if parsed == 'unsatisfiable':
                return self._simple(handler, record, 416, {'Content-Range': 'bytes */%d' % size})
            if parsed is not None:
                start, end = parsed
                status = 206
        headers = dict(resource.headers)
        headers['Accept-Ranges'] = 'none' if resource.no_range else 'bytes'
        if etag:
            headers['ETag'] = etag
        if modified:
            headers['Last-Modified'] = modified
        headers['Content-Type'] = 'application/octet-stream'
        if status == 206:
            headers['Content-Range'] = 'bytes %d-%d/%d' % (start, end, size)
        length = end - start + 1 if size else 0
        if resource.chunked:
            headers['Transfer-Encoding'] = 'chunked'
        else:
            headers['Content-Length'] = str(length)
        record.status = status
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        if head:
            return
        self._send_body(handler, record, _body_chunks(data, file, start, length), resource.chunked,
                        cut, slow)

    @staticmethod
    def _if_range_holds(resource, if_range, etag, modified):
        if not if_range or resource.ignore_if_range:
            return True
        if if_range.startswith('"') or if_range.startswith('W/'):
            # Weak tags never match in If-Range (RFC 9110 13.1.5).
            return etag is not None and if_range == etag
        return modified is not None and if_range == modified

    def _send_body(self, handler, record, chunks, chunked, cut, slow):
        out = handler.wfile
        budget = cut
        for chunk in chunks:
            if budget is not None:
                chunk = chunk[:budget]
                budget -= len(chunk)
            if chunked and chunk:
                out.write(b'%x\r\n' % len(chunk))
            self._write(out, chunk, slow)
            record.sent += len(chunk)
            if chunked and chunk:
                out.write(b'\r\n')
            if budget == 0:
                # The fault: the declared length is never reached.
                out.flush()
                handler.close_connection = True
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
        if chunked:
            out.write(b'0\r\n\r\n')
        out.flush()

    def _write(self, out, chunk, slow):
        if not slow:
            out.write(chunk)
            return
        # A few writes per second at the given rate; a throttle slower than a
        # client's read timeout makes that timeout fire.
        step = max(1, int(slow * 0.05))
        view = memoryview(chunk)
        for offset in range(0, len(view), step):
            if self._stopping.is_set():
                raise ConnectionAbortedError('server stopping')
            piece = view[offset:offset + step]
            out.write(piece)
            out.flush()
            time.sleep(len(piece) / float(slow))

    def _simple(self, handler, record, status, headers=None):
        body = ('%d\n' % status).encode('ascii')
        record.status = status
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header('Content-Type', 'text/plain')
        handler.send_header('Content-Length', str(len(body)))
        handler.end_headers()
        if handler.command != 'HEAD':
            handler.wfile.write(body)
            record.sent += len(body)
        handler.wfile.flush()


def _parse_range(value, size):
    """(start, end) of a single byte range, None to ignore it, or 'unsatisfiable'."""
    value = value.strip()
    if not value.startswith('bytes=') or ',' in value:
        return None  # multiple ranges or another unit: send everything
    first, dash, last = value[len('bytes='):].strip().partition('-')
    if not dash:
        return None
    try:
        if first == '':
            suffix = int(last)
            if suffix <= 0:
                return 'unsatisfiable'
            return max(0, size - suffix), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return 'unsatisfiable'
    return start, min(end, size - 1)


def _body_chunks(data, file, start, length):
    if data is not None:
        view = memoryview(data)
        for offset in range(start, start + length, _FILE_CHUNK):
            yield view[offset:min(offset + _FILE_CHUNK, start + length)]
        return
    with open(file, 'rb') as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(_FILE_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


try:
    import pytest
except ImportError:  # pragma: no cover - script use without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture
    def http_server():
        """A started LocalHTTPServer, stopped after the test."""
        with LocalHTTPServer() as server:
            yield server
else:  # pragma: no cover
    http_server = None


def main(argv=None):
    parser = argparse.ArgumentParser(description='Serve a directory over HTTP on 127.0.0.1 '
                                                 '(Range, ETag; for demos and benchmarks).')
    parser.add_argument('--port', type=int, default=0, help='port (0: any free port)')
    parser.add_argument('--dir', required=True, help='directory to serve')
    parser.add_argument('--verbose', action='store_true', help='log every request to stderr')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.dir):
        parser.error('not a directory: %s' % args.dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    with LocalHTTPServer(root=args.dir, port=args.port, verbose=args.verbose) as server:
        print(server.url + '/', flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
