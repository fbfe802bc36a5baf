# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Who refers to an image: the store's reference records.

Images know nothing of their users (containerd's content store); their users
are recorded here, one small file per reference::

    refs/<image hex>/<kind>-<sha256(key)>.json   {"kind", "key", "digest", "since"}
    refs/<image hex>/last-used                   its mtime is the image's last use

``kind`` is ``alias`` (key: the alias), ``instance`` (the instance name),
``child`` (the child image's digest), ``mutable`` (a mutable image's path)
or ``pin``.  "Who uses X" is one listing of X's folder, "what is
unreferenced" one listing of refs/, and garbage collection is a mark and
sweep over these records, so nothing scans instance folders per image.

Every change happens under the store lock, in an order that can only leave
a reference too many, never one too few: a reference is written before the
thing it records becomes visible (an alias file, an instance folder) and
removed after that thing is gone.  ``verify()`` drops the extra ones a
killed process may leave, given what really exists.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import calendar
import errno
import os
import re
import time

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import StoreError, os_error
from ansible_collections.vmimage.qemu.plugins.module_utils._core.fs import (
    collect_temporaries, fsync_dir, read_json, write_json_atomic,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.layout import key_name, now
from ansible_collections.vmimage.qemu.plugins.module_utils._core.locks import FileLock, try_lock
from ansible_collections.vmimage.qemu.plugins.module_utils._core.staging import remove_tree

KINDS = ('alias', 'instance', 'child', 'mutable', 'pin')
LAST_USED = 'last-used'
LEASE_PREFIX = 'lease-'
_HEX64 = re.compile(r'^[0-9a-f]{64}$')
_REF_FILE = re.compile(r'^(%s)-([0-9a-f]{64})\.json$' % '|'.join(KINDS))


class Reference(object):
    """One reference: ``kind`` and ``key`` (see the module doc)."""

    __slots__ = ('kind', 'key')

    def __init__(self, kind, key):
        self.kind = kind
        self.key = key

    def describe(self):
        """How results name it: 'instance ci-3', 'child image sha256:…'."""
        label = {'alias': 'alias', 'instance': 'instance', 'child': 'child image', 'mutable': 'mutable image',
                 'pin': 'pin'}[self.kind]
        return '%s %s' % (label, self.key)

    def __eq__(self, other):
        return isinstance(other, Reference) and (self.kind, self.key) == (other.kind, other.key)

    def __hash__(self):
        return hash((self.kind, self.key))

    def __repr__(self):
        return 'Reference(%r, %r)' % (self.kind, self.key)


def _hex(digest):
    if not isinstance(digest, str) or not digest.startswith('sha256:') or not _HEX64.match(digest[7:]):
        raise StoreError('not a sha256 digest: %r' % (digest,))
    return digest[7:]


class References(object):
    """The reference records under ``<store>/refs``."""

    def __init__(self, root):
        self.root = root

    def _folder(self, digest):
        return os.path.join(self.root, _hex(digest))

    def _file(self, digest, kind, key):
        if kind not in KINDS:
            raise StoreError('unknown reference kind %r' % (kind,))
        return os.path.join(self._folder(digest), '%s-%s.json' % (kind, key_name(key)))

    def _ensure_folder(self, digest):
        folder = self._folder(digest)
        for path in (self.root, folder):
            try:
                os.mkdir(path, 0o700)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise os_error(exc, 'create', path, StoreError)
        return folder

    # ------------------------------------------------------------ changes (store lock held)

    def add(self, digest, kind, key):
        """Record that ``kind``/``key`` refers to ``digest`` (idempotent)."""
        path = self._file(digest, kind, key)
        if os.path.exists(path):
            return False
        folder = self._ensure_folder(digest)
        collect_temporaries(folder)
        write_json_atomic(path, {'kind': kind, 'key': key, 'digest': digest, 'since': now()}, mode=0o600)
        return True

    def remove(self, digest, kind, key):
        """Drop that reference (idempotent)."""
        path = self._file(digest, kind, key)
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise os_error(exc, 'remove', path, StoreError)
        fsync_dir(os.path.dirname(path))
        return True

    def forget(self, digest):
        """Drop every record of an image that is gone (its folder)."""
        remove_tree(self._folder(digest))

    def touch(self, digest, when=None):
        """Record a use of ``digest`` now (or at ``when``, a POSIX time)."""
        folder = self._ensure_folder(digest)
        path = os.path.join(folder, LAST_USED)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            os.utime(path, None if when is None else (when, when))
        except OSError as exc:
            raise os_error(exc, 'record the last use of %s in' % digest, path, StoreError)

    def lease(self, digest):
        """A Lease on ``digest``: held for as long as an operation uses
        the image before its own reference exists (containerd's leases).  A
        flock, so it dies with its holder.  Take it under the store lock,
        after checking the image exists."""
        folder = self._ensure_folder(digest)
        path = os.path.join(folder, '%s%d-%s.lock' % (LEASE_PREFIX, os.getpid(), os.urandom(6).hex()))
        return Lease(path, FileLock(path, timeout=0).acquire())

    def leased(self, digest, collect=False):
        """Whether a live operation holds a lease on ``digest``; with
        ``collect``, dead leases are removed on the way."""
        folder = self._folder(digest)
        try:
            names = os.listdir(folder)
        except OSError:
            return False
        live = False
        for name in names:
            if not name.startswith(LEASE_PREFIX):
                continue
            path = os.path.join(folder, name)
            try:
                held = try_lock(path)
            except OSError:
                continue
            if held is None:
                live = True
                continue
            try:
                if collect:
                    os.unlink(path)
            finally:
                held.release()
        return live

    # ------------------------------------------------------------ questions

    def of(self, digest):
        """The references to ``digest``, sorted (kind, key); leases are not references."""
        folder = self._folder(digest)
        try:
            names = os.listdir(folder)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return []
            raise os_error(exc, 'list the references in', folder, StoreError)
        refs = []
        for name in names:
            if not _REF_FILE.match(name):
                continue
            entry = read_json(os.path.join(folder, name))
            if isinstance(entry, dict) and entry.get('kind') in KINDS and isinstance(entry.get('key'), str):
                refs.append(Reference(entry['kind'], entry['key']))
        return sorted(refs, key=lambda r: (KINDS.index(r.kind), r.key))

    def last_used(self, digest):
        """POSIX time of the last recorded use, or None."""
        try:
            return os.stat(os.path.join(self._folder(digest), LAST_USED)).st_mtime
        except OSError:
            return None

    def digests(self):
        """Every digest that has a records folder."""
        try:
            names = os.listdir(self.root)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return []
            raise os_error(exc, 'list the references in', self.root, StoreError)
        return sorted('sha256:' + n for n in names if _HEX64.match(n))

    def verify(self, exists):
        """Drop references whose holder is gone.  ``exists(digest, ref)``
        says whether the holder still refers to ``digest``.  Returns the
        references dropped, as (digest, Reference)."""
        dropped = []
        for digest in self.digests():
            for ref in self.of(digest):
                if not exists(digest, ref):
                    self.remove(digest, ref.kind, ref.key)
                    dropped.append((digest, ref))
        return dropped


class Lease(object):
    """A held lease (see References.lease); ``release()`` ends it."""

    def __init__(self, path, lock):
        self.path = path
        self._lock = lock

    def release(self):
        if self._lock is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        finally:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def posix_time(text):
    """A record's timestamp ('2026-12-02T01:02:03Z') as POSIX time, or None."""
    try:
        return calendar.timegm(time.strptime(text, '%Y-%m-%dT%H:%M:%SZ'))
    except (TypeError, ValueError):
        return None


def iso_time(posix):
    """A POSIX time as records write it, or None."""
    if posix is None:
        return None
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(posix))
