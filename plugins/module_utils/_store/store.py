# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""The persistent image store: content-addressed images, aliases, staging.

Layout under the store root (every name below is derived, never taken from
input)::

    .lock                       store lock: aliases, commits, removals, references
    images/<sha256 hex>/        committed images (read-only) + image.json record
    aliases/<sha256(alias)>.json  {"alias", "digest", "source", "checksum", ...}
    staging/<random>/ + .lock   in-progress fetches, each owned by a live flock
    locks/<sha256(key)>.lock    one fetch per key at a time
    instances/<name>/           copy-on-write instances (see instance.py)

A fetch downloads, hashes, decompresses and extracts in one pass into
staging, verifies the digest, validates, then renames the folder into
``images/`` under the store lock (the containerd move).  A killed fetch leaves
a staging folder whose lock died with it; the next fetch removes it.

Operating-system errors (a full file system, a read-only store, a folder the
user may not enter) come out as NoSpaceError / PermissionDeniedError /
StoreError naming the action and the path; a failed fetch leaves the store as
it was (its staging folder removed, no image or alias half-made).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import hashlib
import os
import re
import shutil
import stat
import time

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.reader import (
    DISK, LAYER, MACHINE, extract_image_archive,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.fs import (  # noqa: F401 (re-exported)
    fsync_dir, read_json, write_json_atomic,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    ImageInUseError, NotFoundError, StoreError, os_error, os_errors,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.validator import (
    VALIDATOR_VERSION, validate_image_folder,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import DEFAULT_LIMITS
from ansible_collections.vmimage.qemu.plugins.module_utils._core.locks import FileLock, try_lock
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.sparse_file import allocated_bytes

DEFAULT_STORE = '/var/lib/vm-images'
STORE_FORMAT = 1
RECORD = 'image.json'
INSTANCE_RECORD = 'instance.json'
# How often a fetch starts over when the server cannot resume (the same
# number as download.MAX_RESTARTS, which is not imported here so that the
# store's other users do not load the HTTP stack).
MAX_RESTARTS = 3
MAX_ALIAS_LENGTH = 1024
_HEX64 = re.compile(r'^[0-9a-f]{64}$')
_DIGEST = re.compile(r'^sha256:([0-9a-f]{64})$')


def now():
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())


def key_name(text):
    """A file name derived from any string: its sha256."""
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


def parse_digest(value):
    """'sha256:<hex>' -> hex, or None if ``value`` is not a digest reference."""
    match = _DIGEST.match(value or '')
    return match.group(1) if match else None


def check_alias(alias):
    if not isinstance(alias, str) or not alias:
        raise StoreError('image_id must be a non-empty string')
    if len(alias) > MAX_ALIAS_LENGTH:
        raise StoreError('image_id is longer than %d characters' % MAX_ALIAS_LENGTH)
    if any(ord(c) < 32 or ord(c) == 127 for c in alias):
        raise StoreError('image_id contains control characters')
    if alias.startswith('sha256:'):
        raise StoreError("image_id may not start with 'sha256:' (that names a digest)")
    return alias


def _listdir(path, what):
    """Sorted names in folder ``path``; [] when it does not exist.  Any
    other failure (a folder the user may not read) is an error naming ``what``
    was being listed, never an empty answer."""
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return []
        raise os_error(exc, 'list the %s in' % what, path, StoreError)


def _make_tree_writable(path):
    """Cached images are read-only (files 0444, folder 0555); removal needs
    write permission on the folder first."""
    for dirpath, dirnames, _filenames in os.walk(path):
        os.chmod(dirpath, 0o700)
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o700)


class FetchResult(object):
    __slots__ = ('changed', 'downloaded', 'digest', 'alias', 'record', 'source', 'previous_digest',
                 'attempts', 'restarts', 'resumed')

    def __init__(self, changed, downloaded, digest, alias, record, source, previous_digest=None,
                 attempts=0, restarts=0, resumed=0):
        self.changed = changed
        self.downloaded = downloaded
        self.digest = digest
        self.alias = alias
        self.record = record
        self.source = source
        self.previous_digest = previous_digest
        self.attempts = attempts
        self.restarts = restarts
        self.resumed = resumed


class ImageStore(object):
    """One store folder on this host.  Safe for any number of processes."""

    def __init__(self, root=DEFAULT_STORE, limits=DEFAULT_LIMITS, use_qemu_img=True, create=True,
                 mode=0o700, lock_timeout=3600):
        self.root = os.path.abspath(root)
        self.limits = limits
        self.use_qemu_img = use_qemu_img
        self.lock_timeout = lock_timeout
        self.images_dir = os.path.join(self.root, 'images')
        self.aliases_dir = os.path.join(self.root, 'aliases')
        self.staging_dir = os.path.join(self.root, 'staging')
        self.locks_dir = os.path.join(self.root, 'locks')
        self.instances_dir = os.path.join(self.root, 'instances')
        self.exists = os.path.isdir(self.root)
        if create:
            self.ensure(mode)

    # ------------------------------------------------------------ layout

    def ensure(self, mode=0o700):
        """Create the store (restrictive permissions) if it does not exist."""
        if not os.path.isdir(self.root):
            try:
                os.makedirs(self.root, mode)
                os.chmod(self.root, mode)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise os_error(exc, 'create store', self.root, StoreError)
        try:
            st = os.lstat(self.root)
        except OSError as exc:
            raise os_error(exc, 'open store', self.root, StoreError)
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError('store path %s is not a directory' % self.root)
        for sub in (self.images_dir, self.aliases_dir, self.staging_dir, self.locks_dir, self.instances_dir):
            try:
                os.mkdir(sub, 0o755 if sub in (self.images_dir, self.instances_dir) else 0o700)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise os_error(exc, 'create', sub, StoreError)
        self.exists = True

    def lock(self, exclusive=True):
        """The store lock: held while aliases, commits and references change."""
        return FileLock(os.path.join(self.root, '.lock'), exclusive=exclusive, timeout=self.lock_timeout)

    # ------------------------------------------------------------ lookups

    def image_path(self, digest):
        hexdigest = parse_digest(digest)
        if hexdigest is None:
            raise StoreError('not a sha256 digest: %r' % (digest,))
        return os.path.join(self.images_dir, hexdigest)

    def get_record(self, digest):
        # read_json answers None for a missing image, and fails (rather than
        # answering None) when the image cannot be read.
        return read_json(os.path.join(self.image_path(digest), RECORD))

    def get_alias(self, alias):
        return read_json(os.path.join(self.aliases_dir, key_name(alias) + '.json'))

    def resolve(self, ref):
        """An alias or 'sha256:<hex>' -> digest of a committed image; NotFoundError otherwise."""
        if parse_digest(ref):
            if self.get_record(ref) is None:
                raise self._not_found(ref)
            return ref
        entry = self.get_alias(ref)
        if entry is None:
            raise self._not_found('with image_id %r' % (ref,))
        if self.get_record(entry['digest']) is None:
            raise StoreError('image_id %r points at %s, which is missing from the store'
                             % (ref, entry['digest']))
        return entry['digest']

    def _not_found(self, what):
        if not os.path.isdir(self.root):
            return NotFoundError('no image %s: store %s does not exist' % (what, self.root))
        return NotFoundError('no image %s in store %s' % (what, self.root))

    def find_by_digest(self, algorithm, hexdigest):
        """Find a committed image by any digest recorded for it."""
        if algorithm == 'sha256':
            digest = 'sha256:' + hexdigest
            return digest if self.get_record(digest) is not None else None
        for record in self.iter_records():
            if record.get('digests', {}).get(algorithm) == hexdigest:
                return record['digest']
        return None

    def iter_records(self):
        for name in _listdir(self.images_dir, 'images'):
            if not _HEX64.match(name):
                continue
            record = read_json(os.path.join(self.images_dir, name, RECORD))
            if record is not None:
                yield record

    def aliases(self):
        """alias -> entry for every alias."""
        result = {}
        for name in _listdir(self.aliases_dir, 'image names (aliases)'):
            if name.endswith('.json') and _HEX64.match(name[:-5]):
                entry = read_json(os.path.join(self.aliases_dir, name))
                if entry is not None:
                    result[entry['alias']] = entry
        return result

    def instance_records(self):
        records = []
        for name in _listdir(self.instances_dir, 'instances'):
            if name.startswith('.'):
                continue  # .new-*/.old-*: staging of instance creation and removal
            record = read_json(os.path.join(self.instances_dir, name, INSTANCE_RECORD))
            if record is not None:
                records.append(record)
        return records

    def users(self, digest):
        """What keeps an image alive besides aliases: instances and child images."""
        users = ['instance %s' % r['name'] for r in self.instance_records() if r.get('digest') == digest]
        users.extend('child image %s' % r['digest'] for r in self.iter_records() if r.get('parent') == digest)
        return users

    def describe(self, record, aliases=None):
        """A record plus its aliases and live usage numbers, for results."""
        if aliases is None:
            aliases = self.aliases()
        path = self.image_path(record['digest'])
        info = dict(record)
        info['aliases'] = sorted(a for a, e in aliases.items() if e['digest'] == record['digest'])
        info['path'] = path
        info['disk'] = os.path.join(path, DISK)
        info['layer'] = os.path.join(path, LAYER)
        info['machine_path'] = os.path.join(path, MACHINE)
        info['instances'] = len([r for r in self.instance_records() if r.get('digest') == record['digest']])
        return info

    def usage(self):
        records = list(self.iter_records())
        return {
            'images': len(records),
            'aliases': len(self.aliases()),
            'apparent_size': sum(r.get('apparent_size', 0) for r in records),
            'allocated_size': sum(r.get('allocated_size', 0) for r in records),
            'virtual_size': sum(r.get('virtual_size', 0) for r in records),
        }

    # ------------------------------------------------------------ staging

    def cleanup_staging(self):
        """Remove staging debris whose owner died (its flock is gone)."""
        removed = []
        names = set(_listdir(self.staging_dir, 'staging folders'))
        for name in sorted(names):
            path = os.path.join(self.staging_dir, name)
            if name.endswith('.lock'):
                held = try_lock(path)
                if held is None:
                    continue  # owner alive
                try:
                    folder = path[:-5]
                    if os.path.isdir(folder):
                        _make_tree_writable(folder)
                        shutil.rmtree(folder, ignore_errors=True)
                        removed.append(os.path.basename(folder))
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                finally:
                    held.release()
            elif os.path.isdir(path) and (name + '.lock') not in names:
                # Owners create the lock before the folder and remove the
                # folder before the lock, so a folder without one is debris.
                _make_tree_writable(path)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
        return removed

    def _new_staging(self):
        token = '%d-%s' % (os.getpid(), os.urandom(6).hex())
        lock = FileLock(os.path.join(self.staging_dir, token + '.lock'), timeout=0).acquire()
        folder = os.path.join(self.staging_dir, token)
        try:
            os.mkdir(folder, 0o700)
        except BaseException:
            self._drop_staging(folder, lock)
            raise
        return folder, lock

    def _drop_staging(self, folder, lock):
        try:
            if os.path.isdir(folder):
                try:
                    _make_tree_writable(folder)
                except OSError:
                    pass  # never hide the error that brought us here
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.unlink(lock.path)
            except OSError:
                pass
        finally:
            lock.release()

    # ------------------------------------------------------------ fetch

    def _set_alias(self, alias, digest, source, checksum):
        entry = self.get_alias(alias)
        if entry is not None and entry.get('digest') == digest and entry.get('source') == source \
                and entry.get('checksum') == checksum:
            return False
        write_json_atomic(os.path.join(self.aliases_dir, key_name(alias) + '.json'), {
            'alias': alias, 'digest': digest, 'source': source, 'checksum': checksum, 'updated_at': now(),
        })
        return True

    def touch(self, digest):
        """Record a use of the image (last_used); callers hold the store lock."""
        path = os.path.join(self.image_path(digest), RECORD)
        record = read_json(path)
        if record is None:
            return
        record['last_used'] = now()
        folder = os.path.dirname(path)
        os.chmod(folder, 0o755)
        try:
            write_json_atomic(path, record, mode=0o444)
        finally:
            os.chmod(folder, 0o555)

    def _present(self, alias, url, checksum_text, spec):
        """The no-network answer: digest already satisfying the request, or None."""
        if spec is not None and spec.hexdigest:
            return self.find_by_digest(spec.algorithm, spec.hexdigest)
        entry = self.get_alias(alias)
        if entry is None or entry.get('source') != url or entry.get('checksum') != checksum_text:
            return None
        if self.get_record(entry['digest']) is None:
            return None
        return entry['digest']

    def fetch(self, url, mirrors=(), checksum=None, alias=None, force=False, check_mode=False,
              retries=8, timeout=30, download_options=None, sleep=None):
        """Make ``alias`` point at the image from ``url``; download only if needed.

        Returns a FetchResult.  With check_mode nothing is written and nothing
        downloaded; ``changed`` says what a real run would do.

        ``mirrors`` are URLs or dicts with their own credentials (see
        download.check_mirrors); the credentials and headers in
        ``download_options`` are those of ``url`` and reach a mirror or the
        checksum file only on the same origin.
        """
        # The HTTP stack (requests, urllib3) is imported only by fetches: the
        # other users of the store (instances, info) stay cheap to start.
        from ansible_collections.vmimage.qemu.plugins.module_utils._transfer.checksum import parse_checksum
        from ansible_collections.vmimage.qemu.plugins.module_utils._transfer.download import check_mirrors, redact_url
        source = redact_url(url)
        alias = check_alias(alias or 'url:' + source)
        spec = parse_checksum(checksum) if checksum else None
        mirrors = check_mirrors(mirrors)
        with os_errors('fetch %s into store' % source, self.root, StoreError):
            return self._fetch(url, source, alias, spec, checksum or None, mirrors, force, check_mode, retries,
                               timeout, download_options, sleep)

    def _fetch(self, url, source, alias, spec, checksum_text, mirrors, force, check_mode, retries, timeout,
               download_options, sleep):
        previous = self.get_alias(alias)
        previous_digest = previous['digest'] if previous else None

        if not force:
            digest = self._present(alias, source, checksum_text, spec)
            if digest is not None:
                return self._use_present(alias, digest, source, checksum_text, previous_digest, check_mode)
        if check_mode:
            return FetchResult(True, False, None, alias, None, source, previous_digest)

        key = 'digest:%s:%s' % (spec.algorithm, spec.hexdigest) if spec and spec.hexdigest else 'alias:' + alias
        with FileLock(os.path.join(self.locks_dir, key_name(key) + '.lock'), timeout=self.lock_timeout):
            if not force:
                # Another process may have committed it while we waited.
                digest = self._present(alias, source, checksum_text, spec)
                if digest is not None:
                    return self._use_present(alias, digest, source, checksum_text, previous_digest, False)
            self.cleanup_staging()
            return self._download_and_commit(url, mirrors, spec, alias, source, checksum_text,
                                             previous_digest, retries, timeout, download_options or {}, sleep)

    def _use_present(self, alias, digest, source, checksum_text, previous_digest, check_mode):
        entry = self.get_alias(alias)
        needs_alias = entry is None or entry.get('digest') != digest or entry.get('source') != source \
            or entry.get('checksum') != checksum_text
        changed = entry is None or entry.get('digest') != digest
        if not check_mode:
            with self.lock():
                if needs_alias:
                    self._set_alias(alias, digest, source, checksum_text)
                self.touch(digest)
        record = self.get_record(digest)
        return FetchResult(changed, False, digest, alias, record, source, previous_digest)

    def _download_and_commit(self, url, mirrors, spec, alias, source, checksum_text, previous_digest,
                             retries, timeout, download_options, sleep):
        from ansible_collections.vmimage.qemu.plugins.module_utils._transfer.checksum import resolve_checksum, verify_digest
        from ansible_collections.vmimage.qemu.plugins.module_utils._transfer.download import (
            DownloadRestartRequired, fetch_first, restarts_exhausted,
        )
        kw = dict(download_options)
        kw.update(retries=retries, timeout=timeout)
        kw.setdefault('credentials_origin', url)
        if sleep is not None:
            kw['sleep'] = sleep
        expected = spec
        if spec is not None and spec.url:
            expected = resolve_checksum(spec, url, **kw)
        algorithms = ['sha256']
        if expected is not None and expected.algorithm not in algorithms:
            algorithms.append(expected.algorithm)
        staging, staging_lock = self._new_staging()
        try:
            urls = list(mirrors or ()) + [url]
            stream = fetch_first(urls, hash_algorithms=tuple(algorithms),
                                 max_bytes=self.limits.max_compressed_bytes, **kw)
            try:
                folder = os.path.join(staging, 'image')
                restarts = 0
                while True:
                    os.mkdir(folder, 0o700)
                    try:
                        with os_errors('extract %s into' % stream.source, folder, StoreError):
                            extract_image_archive(stream, folder, limits=self.limits, fsync=True)
                        # The tar ended; anything left must still be hashed
                        # (and be empty), and may be cut off as well.
                        while stream.read(1024 * 1024):
                            pass
                        break
                    except DownloadRestartRequired as exc:
                        restarts += 1
                        shutil.rmtree(folder)
                        if restarts > MAX_RESTARTS:
                            raise restarts_exhausted(stream.source, MAX_RESTARTS, exc)
                digests = dict((algo, stream.hexdigest(algo)) for algo in algorithms)
                used_source = stream.source
                attempts, resumed = stream.attempts, stream.resumed
            finally:
                stream.close()
            if expected is not None:
                verify_digest(expected, digests[expected.algorithm], used_source)
            digest = 'sha256:' + digests['sha256']
            info = validate_image_folder(folder, limits=self.limits, use_qemu_img=self.use_qemu_img)
            record = {
                'format': STORE_FORMAT,
                'digest': digest,
                'digests': digests,
                'source': used_source,
                'fetched_at': now(),
                'last_used': now(),
                'apparent_size': sum(os.path.getsize(os.path.join(folder, n)) for n in (DISK, LAYER, MACHINE)),
                'allocated_size': info.allocated_size,
                'virtual_size': info.virtual_size,
                'disk_size': info.disk_size,
                'validator_version': VALIDATOR_VERSION,
                'machine': info.machine,
                'parent': None,
            }
            write_json_atomic(os.path.join(folder, RECORD), record, mode=0o444)
            for name in (DISK, LAYER, MACHINE):
                os.chmod(os.path.join(folder, name), 0o444)
            os.chmod(folder, 0o555)
            fsync_dir(folder)
            with self.lock():
                target = self.image_path(digest)
                committed = False
                if not os.path.isdir(target):
                    os.rename(folder, target)
                    fsync_dir(self.images_dir)
                    committed = True
                try:
                    alias_changed = self._set_alias(alias, digest, source, checksum_text)
                except BaseException:
                    if committed:
                        # Without its alias the new image is debris: nothing
                        # can refer to it yet (the store lock is held), so it
                        # goes, and the store is as it was.
                        self._remove_image_locked(digest)
                    raise
                if not committed:
                    self.touch(digest)
            record = self.get_record(digest)
            changed = committed or alias_changed and previous_digest != digest
            return FetchResult(changed, True, digest, alias, record, used_source, previous_digest,
                               attempts, restarts, resumed)
        finally:
            self._drop_staging(staging, staging_lock)

    # ------------------------------------------------------------ removal

    def remove_alias(self, alias, check_mode=False):
        """Remove ``alias``; remove its image too when nothing else refers to it.

        Returns (changed, removed_digest or None).  Refuses, naming the users,
        when the image would go while instances or child images need it.
        """
        check_alias(alias)
        with os_errors('remove image_id %r from store' % (alias,), self.root, StoreError):
            return self._remove_alias(alias, check_mode)

    def _remove_alias(self, alias, check_mode):
        with self.lock(exclusive=not check_mode):
            entry = self.get_alias(alias)
            if entry is None:
                return False, None
            digest = entry['digest']
            others = [a for a, e in self.aliases().items() if e['digest'] == digest and a != alias]
            removes_image = not others and self.get_record(digest) is not None
            if removes_image:
                users = self.users(digest)
                if users:
                    raise ImageInUseError('image %s (%s) is in use by %s; remove those first'
                                          % (alias, digest, ', '.join(users)))
            if check_mode:
                return True, digest if removes_image else None
            os.unlink(os.path.join(self.aliases_dir, key_name(alias) + '.json'))
            fsync_dir(self.aliases_dir)
            if removes_image:
                self._remove_image_locked(digest)
            return True, digest if removes_image else None

    def _remove_image_locked(self, digest):
        """Rename out of images/ first, so the image vanishes atomically."""
        path = self.image_path(digest)
        trash = os.path.join(self.staging_dir, 'removed-%s-%s' % (digest[7:19], os.urandom(4).hex()))
        os.rename(path, trash)
        fsync_dir(self.images_dir)
        _make_tree_writable(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def image_allocated(self, digest):
        path = self.image_path(digest)
        return sum(allocated_bytes(os.path.join(path, n)) for n in (DISK, LAYER, MACHINE))
