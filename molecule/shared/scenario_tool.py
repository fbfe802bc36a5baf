# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Background processes of the molecule scenarios, started by create and
stopped by destroy, which run as separate ansible-playbook invocations:

    scenario_tool.py serve --dir DIR --pid-file F --port-file F --log F
        HTTP/1.1 file server on 127.0.0.1 (GET/HEAD, one byte range per
        request, ETag/Last-Modified, If-Range) on a port the kernel picks;
        detaches once it listens.
    scenario_tool.py start-sshd --config F --pid-file F --port-file F --log F
        /usr/bin/sshd with that config on 127.0.0.1 and a free port, trying
        another port when the one picked was taken meanwhile.
    scenario_tool.py stop --pid-file F [--match TEXT] [--children]
        SIGTERM (SIGKILL after a grace period) to the process in the pid file
        when it is still the process meant (same start time as recorded, or
        for a bare pid a command line containing TEXT), and with --children to the
        processes it forked (sshd's per-connection processes).

Every command prints one JSON object whose "changed" says whether it started
or stopped something; starting what already runs reports the running one.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import argparse
import email.utils
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

try:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
except ImportError:  # pragma: no cover - Python < 3.7 is not a controller
    BaseHTTPRequestHandler = ThreadingHTTPServer = None

SSHD = '/usr/sbin/sshd'
BIND = '127.0.0.1'
CHUNK = 1024 * 1024
RANGE_RE = re.compile(r'^bytes=(\d*)-(\d*)$')


def _emit(**result):
    print(json.dumps(result, sort_keys=True))
    return 0


def _write_atomic(path, text):
    tmp = '%s.tmp-%d' % (path, os.getpid())
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_int(path):
    fields = _read_fields(path)
    try:
        return int(fields[0])
    except (IndexError, ValueError):
        return None


def _read_fields(path):
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return []


def _cmdline(pid):
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            raw = f.read()
    except OSError:
        return None
    return raw.replace(b'\0', b' ').decode('utf-8', 'replace')


def _stat_fields(pid):
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1], starttime [19])."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid):
    """True while the process exists and is not a zombie waiting for its parent."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in ('Z', 'X')


def _identity(pid):
    """'<pid> <start time>': unlike a bare pid, never names a later process."""
    return '%d %s' % (pid, _stat_fields(pid)[19])


def _running(pid_file, match=None):
    """The pid in pid_file while that process is alive and still the one
    meant: a stale pid may belong to anybody by now.  Our own pid files hold
    the process's start time too; sshd's hold only the pid, so its command
    line must contain match (the absolute config path given with -f)."""
    fields = _read_fields(pid_file)
    try:
        pid = int(fields[0])
    except (IndexError, ValueError):
        return None
    if pid <= 1 or not _alive(pid):
        return None
    if len(fields) >= 2:
        return pid if _identity(pid) == ' '.join(fields[:2]) else None
    cmdline = _cmdline(pid)
    if not match or cmdline is None or match not in cmdline:
        return None
    return pid


def _children(pid):
    found = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields and int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def free_port():
    """A port nobody listens on right now (the caller must cope with losing a race for it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((BIND, 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


# --- HTTP server -------------------------------------------------------------

def _make_handler(root):
    root = os.path.realpath(root)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'
        server_version = 'vmimage-molecule'

        def log_message(self, format, *args):  # pylint: disable=redefined-builtin
            sys.stderr.write('%s %s\n' % (self.log_date_time_string(), format % args))
            sys.stderr.flush()

        def _resolve(self):
            path = self.path.split('?', 1)[0]
            parts = [p for p in path.split('/') if p]
            if any(p in ('.', '..') or '\0' in p for p in parts):
                return None
            full = os.path.realpath(os.path.join(root, *parts))
            if not full.startswith(root + os.sep) or not os.path.isfile(full):
                return None
            return full

        def _simple(self, status, headers=None):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header('Content-Length', '0')
            self.end_headers()

        def _serve(self, with_body):
            full = self._resolve()
            if full is None:
                self._simple(404)
                return
            with open(full, 'rb') as f:
                st = os.fstat(f.fileno())
                size = st.st_size
                etag = '"%x-%x"' % (st.st_size, st.st_mtime_ns)
                last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
                start, end = 0, size - 1
                status = 200
                wanted = self.headers.get('Range')
                if_range = self.headers.get('If-Range')
                if wanted and if_range not in (None, etag, last_modified):
                    wanted = None  # the client's copy is stale: send everything
                if wanted:
                    m = RANGE_RE.match(wanted.strip())
                    if m and (m.group(1) or m.group(2)):
                        if m.group(1):
                            start = int(m.group(1))
                            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                        else:
                            start = max(size - int(m.group(2)), 0)
                        if start >= size or start > end:
                            self._simple(416, {'Content-Range': 'bytes */%d' % size})
                            return
                        status = 206
                length = end - start + 1 if size else 0
                self.send_response(status)
                self.send_header('Content-Type', 'application/octet-stream')
                self.send_header('Content-Length', str(length))
                self.send_header('Accept-Ranges', 'bytes')
                self.send_header('ETag', etag)
                self.send_header('Last-Modified', last_modified)
                if status == 206:
                    self.send_header('Content-Range', 'bytes %d-%d/%d' % (start, end, size))
                self.end_headers()
                if not with_body:
                    return
                f.seek(start)
                remaining = length
                while remaining > 0:
                    chunk = f.read(min(CHUNK, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._serve(True)

        def do_HEAD(self):  # noqa: N802
            self._serve(False)

    return Handler


def _detach(log_path, ready_fd_w):
    """Second half of the double fork: new session, stdio to the log, so that
    whoever started us (ansible's command module) sees its pipes close."""
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # pylint: disable=protected-access
    os.chdir('/')
    devnull = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)
    os.write(ready_fd_w, b'%d\n' % os.getpid())
    os.close(ready_fd_w)


def cmd_serve(args):
    pid = _running(args.pid_file)
    if pid is not None:
        return _emit(changed=False, pid=pid, port=_read_int(args.port_file), url=_url(args.port_file))
    if not os.path.isdir(args.dir):
        raise SystemExit('scenario_tool serve: not a directory: %s' % args.dir)
    # Bound before forking: a bind error fails this command, not a detached child.
    server = ThreadingHTTPServer((BIND, 0), _make_handler(args.dir))
    server.daemon_threads = True
    port = server.server_address[1]
    ready_r, ready_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(ready_r)
        try:
            _detach(args.log, ready_w)
            _write_atomic(args.pid_file, _identity(os.getpid()) + '\n')
            signal.signal(signal.SIGTERM, lambda *unused: sys.exit(0))
            server.serve_forever()
        finally:
            os._exit(0)  # pylint: disable=protected-access
    os.close(ready_w)
    server.socket.close()
    with os.fdopen(ready_r) as ready:
        child = int(ready.readline() or 0)
    os.waitpid(middle, 0)
    # The pid file is written just after the readiness line: wait for it so a
    # following stop never misses the server.
    deadline = time.monotonic() + 10
    while _read_int(args.pid_file) != child and time.monotonic() < deadline:
        time.sleep(0.02)
    if _read_int(args.pid_file) != child:
        raise SystemExit('scenario_tool serve: the server did not start (see %s)' % args.log)
    _write_atomic(args.port_file, '%d\n' % port)
    return _emit(changed=True, pid=child, port=port, url=_url(args.port_file))


def _url(port_file):
    port = _read_int(port_file)
    return None if port is None else 'http://%s:%d' % (BIND, port)


# --- sshd ---------------------------------------------------------------------

def cmd_start_sshd(args):
    config = os.path.abspath(args.config)
    pid = _running(args.pid_file, config)
    if pid is not None:
        return _emit(changed=False, pid=pid, port=_read_int(args.port_file))
    test = subprocess.run([SSHD, '-t', '-f', config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          check=False)
    if test.returncode != 0:
        raise SystemExit('scenario_tool start-sshd: %s is not a valid sshd config: %s'
                         % (config, test.stdout.decode('utf-8', 'replace').strip()))
    errors = []
    for unused in range(args.attempts):
        port = free_port()
        # sshd binds, then daemonizes: exit status 0 means it listens.
        run = subprocess.run([SSHD, '-f', config, '-E', args.log, '-o', 'ListenAddress=%s:%d' % (BIND, port)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        if run.returncode == 0:
            deadline = time.monotonic() + 10
            while _running(args.pid_file, config) is None and time.monotonic() < deadline:
                time.sleep(0.02)
            pid = _running(args.pid_file, config)
            if pid is None:
                raise SystemExit('scenario_tool start-sshd: sshd started but %s names no live sshd (see %s)'
                                 % (args.pid_file, args.log))
            _write_atomic(args.port_file, '%d\n' % port)
            return _emit(changed=True, pid=pid, port=port)
        errors.append('port %d: exit %d %s' % (port, run.returncode, run.stdout.decode('utf-8', 'replace').strip()))
    raise SystemExit('scenario_tool start-sshd: sshd did not start (log %s): %s' % (args.log, '; '.join(errors)))


# --- stop ---------------------------------------------------------------------

def cmd_stop(args):
    pid = _running(args.pid_file, args.match)
    if pid is None:
        if os.path.exists(args.pid_file):
            os.unlink(args.pid_file)
        return _emit(changed=False, pid=None, children=[])
    # Children first in the list but signalled after their parent has been
    # found: sshd's per-connection processes outlive the listener otherwise.
    children = _children(pid) if args.children else []
    targets = [pid] + children
    for target in targets:
        try:
            os.kill(target, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + args.grace
    while any(_alive(t) for t in targets) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = [t for t in targets if _alive(t)]
    for target in killed:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if os.path.exists(args.pid_file):
        os.unlink(args.pid_file)
    return _emit(changed=True, pid=pid, children=children, killed=killed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0])
    sub = parser.add_subparsers(dest='command')
    sub.required = True

    serve = sub.add_parser('serve', help='detached HTTP file server on 127.0.0.1')
    serve.add_argument('--dir', required=True)
    serve.add_argument('--pid-file', required=True)
    serve.add_argument('--port-file', required=True)
    serve.add_argument('--log', required=True)
    serve.set_defaults(func=cmd_serve)

    sshd = sub.add_parser('start-sshd', help='sshd on 127.0.0.1 and a free port')
    sshd.add_argument('--config', required=True)
    sshd.add_argument('--pid-file', required=True, help='the PidFile of the config')
    sshd.add_argument('--port-file', required=True)
    sshd.add_argument('--log', required=True)
    sshd.add_argument('--attempts', type=int, default=5)
    sshd.set_defaults(func=cmd_start_sshd)

    stop = sub.add_parser('stop', help='stop a process started from a pid file')
    stop.add_argument('--pid-file', required=True)
    stop.add_argument('--match', help='text its command line must contain (pid files holding only a pid)')
    stop.add_argument('--children', action='store_true', help='also stop the processes it forked')
    stop.add_argument('--grace', type=float, default=10.0, help='seconds before SIGKILL')
    stop.set_defaults(func=cmd_stop)

    args = parser.parse_args(argv)
    for name in ('dir', 'pid_file', 'port_file', 'log', 'config'):
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
