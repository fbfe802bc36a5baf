# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""The persistent image store: committed images, aliases, references.

Layout under the store root (every name below is derived, never taken from
input)::

    store.json                  {"format": 2}, written last (see upgrade.py)
    .lock                       store lock: aliases, commits, removals, references
    images/<sha256 hex>/        committed images (read-only) + image.json record
    aliases/<sha256(alias)>.json  {"alias", "digest", "source", "checksum", ...}
    refs/<sha256 hex>/          who refers to the image (references.py)
    staging/                    the store's WorkArea: in-progress fetches, trash
    locks/<sha256(key)>.lock    one fetch (or instance operation) per key at a time
    instances/<name>/           copy-on-write instances (their own package)

The store commits, removes and answers; it does not download (the ingest
package does, into a WorkFolder of ``staging``) and it does not know what
an instance is beyond its reference records.

Operating-system errors (a full file system, a read-only store, a folder the
user may not enter) come out as NoSpaceError / PermissionDeniedError /
StoreError naming the action and the path; a failed operation leaves the
store as it was.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import os
import re
import stat

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.sparse_file import allocated_bytes
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    ImageInUseError, NotFoundError, PermissionDeniedError, StoreError, os_error, os_errors,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.fs import (
    collect_temporaries, fsync_dir, read_json, write_json_atomic,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.layout import (
    ALIASES, DEFAULT_STORE, IMAGE_RECORD, IMAGES, INSTANCE_RECORD, INSTANCES, LOCKS, MEMBER_NAMES, REFS, STAGING,
    STORE_LOCK, STORE_MARKER, DISK, LAYER, MACHINE, key_name, now,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import DEFAULT_LIMITS
from ansible_collections.vmimage.qemu.plugins.module_utils._core.locks import FileLock
from ansible_collections.vmimage.qemu.plugins.module_utils._core.staging import WorkArea
from ansible_collections.vmimage.qemu.plugins.module_utils._store.references import (
    Reference, References, iso_time, posix_time,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._store.upgrade import upgrade_store

STORE_FORMAT = 2
# The format of the image records themselves (image.json).
RECORD_FORMAT = 1
MAX_ALIAS_LENGTH = 1024
_HEX64 = re.compile(r'^[0-9a-f]{64}$')
_DIGEST = re.compile(r'^sha256:([0-9a-f]{64})$')


def parse_digest(value):
    """'sha256:<hex>' -> hex, or None if ``value`` is not a digest reference."""
    match = _DIGEST.match(value or '') if isinstance(value, str) else None
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


class _ScannedReferences(object):
    """References of a store not yet upgraded to format 2 (read-only
    callers may not upgrade it): answered from one scan of the aliases and
    the instance records, with the same questions as References."""

    def __init__(self, store):
        self._refs = {}
        for alias, entry in store.aliases().items():
            self._refs.setdefault(entry.get('digest'), set()).add(Reference('alias', alias))
        for name in _listdir(store.instances_dir, 'instances'):
            if name.startswith('.'):
                continue
            record = read_json(os.path.join(store.instances_dir, name, INSTANCE_RECORD))
            if isinstance(record, dict) and record.get('name') == name:
                self._refs.setdefault(record.get('digest'), set()).add(Reference('instance', name))
        self._records = dict((r['digest'], r) for r in store.iter_records())

    def of(self, digest):
        return sorted(self._refs.get(digest, ()), key=lambda r: (r.kind, r.key))

    def last_used(self, digest):
        return posix_time((self._records.get(digest) or {}).get('last_used'))


class ImageStore(object):
    """One store folder on this host.  Safe for any number of processes."""

    def __init__(self, root=DEFAULT_STORE, limits=DEFAULT_LIMITS, use_qemu_img=True, create=True,
                 mode=0o700, lock_timeout=3600):
        self.root = os.path.abspath(root)
        self.limits = limits
        self.use_qemu_img = use_qemu_img
        self.lock_timeout = lock_timeout
        self.images_dir = os.path.join(self.root, IMAGES)
        self.aliases_dir = os.path.join(self.root, ALIASES)
        self.refs_dir = os.path.join(self.root, REFS)
        self.staging_dir = os.path.join(self.root, STAGING)
        self.locks_dir = os.path.join(self.root, LOCKS)
        self.instances_dir = os.path.join(self.root, INSTANCES)
        self.staging = WorkArea(self.staging_dir)
        self.refs = References(self.refs_dir)
        self.exists = os.path.isdir(self.root)
        self._scanned = None
        if create:
            self.ensure(mode)

    # ------------------------------------------------------------ layout

    def ensure(self, mode=0o700):
        """Create the store (restrictive permissions) if it does not exist,
        and bring a store of an older format up to this one."""
        fresh = not os.path.isdir(self.root)
        if fresh:
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
        for sub in (self.images_dir, self.aliases_dir, self.refs_dir, self.staging_dir, self.locks_dir,
                    self.instances_dir):
            try:
                os.mkdir(sub, 0o755 if sub in (self.images_dir, self.instances_dir) else 0o700)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise os_error(exc, 'create', sub, StoreError)
        self.exists = True
        if self.format() < STORE_FORMAT:
            upgrade_store(self, fresh=fresh)

    def format(self):
        """The store's format: 0 when there is no store, 1 for a store made
        before the format was recorded."""
        if not os.path.isdir(self.root):
            return 0
        marker = read_json(os.path.join(self.root, STORE_MARKER))
        if marker is None:
            return 1
        if not isinstance(marker, dict) or not isinstance(marker.get('format'), int):
            raise StoreError('%s is damaged: %r' % (os.path.join(self.root, STORE_MARKER), marker))
        if marker['format'] > STORE_FORMAT:
            raise StoreError('store %s has format %d; this collection knows formats up to %d: upgrade the '
                             'collection' % (self.root, marker['format'], STORE_FORMAT))
        return marker['format']

    def write_format(self):
        write_json_atomic(os.path.join(self.root, STORE_MARKER), {'format': STORE_FORMAT, 'updated_at': now()})

    def lock(self, exclusive=True):
        """The store lock: held while aliases, commits and references change."""
        return FileLock(os.path.join(self.root, STORE_LOCK), exclusive=exclusive, timeout=self.lock_timeout,
                        what='the lock of store %s' % self.root)

    def key_lock(self, key):
        """A lock of its own for one fetch key or instance name."""
        return FileLock(os.path.join(self.locks_dir, key_name(key) + '.lock'), timeout=self.lock_timeout,
                        what='the lock of %s in store %s' % (key, self.root))

    def collect(self, grace=None):
        """Remove what killed processes left: the staging area's dead work
        folders and trash, and record temporaries older than ``grace``
        seconds (default: fs.TEMP_GRACE).  Returns the names removed."""
        kw = {} if grace is None else dict(grace=grace)
        removed = self.staging.collect()
        for folder in [self.aliases_dir, self.root] + [os.path.join(self.refs_dir, d[7:]) for d in self.refs.digests()]:
            removed.extend(collect_temporaries(folder, **kw))
        return removed

    # ------------------------------------------------------------ lookups

    def image_path(self, digest):
        hexdigest = parse_digest(digest)
        if hexdigest is None:
            raise StoreError('not a sha256 digest: %r' % (digest,))
        return os.path.join(self.images_dir, hexdigest)

    def get_record(self, digest):
        # read_json answers None for a missing image, and fails (rather than
        # answering None) when the image cannot be read.
        return read_json(os.path.join(self.image_path(digest), IMAGE_RECORD))

    def get_alias(self, alias):
        entry = read_json(os.path.join(self.aliases_dir, key_name(alias) + '.json'))
        if entry is not None and (not isinstance(entry, dict) or entry.get('alias') != alias
                                  or parse_digest(entry.get('digest')) is None):
            raise StoreError('the record of image_id %r is damaged: %r' % (alias, entry))
        return entry

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

    def _record_of(self, name):
        """The record of images/<name>, or None when it is missing or damaged
        (then the folder is an incomplete image, see incomplete_images())."""
        try:
            record = read_json(os.path.join(self.images_dir, name, IMAGE_RECORD))
        except StoreError as exc:
            if isinstance(exc, PermissionDeniedError):
                raise
            return None
        if not isinstance(record, dict) or record.get('digest') != 'sha256:' + name:
            return None
        return record

    def iter_records(self):
        """The records of the committed images.  One missing or damaged
        record does not fail the listing: that image is left out here and
        reported by incomplete_images()."""
        for name in _listdir(self.images_dir, 'images'):
            if _HEX64.match(name):
                record = self._record_of(name)
                if record is not None:
                    yield record

    def incomplete_images(self):
        """(digest, path) of folders in images/ without a valid record: no
        writer of the collection leaves one, but a hand-edited store or a
        damaged disk can."""
        return [('sha256:' + name, os.path.join(self.images_dir, name))
                for name in _listdir(self.images_dir, 'images')
                if _HEX64.match(name) and self._record_of(name) is None]

    def aliases(self):
        """alias -> entry for every alias."""
        result = {}
        for name in _listdir(self.aliases_dir, 'image names (aliases)'):
            if name.endswith('.json') and _HEX64.match(name[:-5]):
                entry = read_json(os.path.join(self.aliases_dir, name))
                if isinstance(entry, dict) and isinstance(entry.get('alias'), str):
                    result[entry['alias']] = entry
        return result

    def references(self):
        """The reference records, or their equivalent from one scan for a
        store of an older format that this (read-only) caller did not upgrade."""
        if self.format() >= STORE_FORMAT:
            return self.refs
        if self._scanned is None:
            self._scanned = _ScannedReferences(self)
        return self._scanned

    def live_references(self, digest):
        """The references to ``digest`` whose holder still refers to it: a
        process killed between removing a thing and its reference leaves one
        reference too many, which must not count."""
        return [ref for ref in self.references().of(digest) if self._holder_exists(digest, ref)]

    def users(self, digest):
        """What keeps an image alive besides aliases: ['instance a', 'child image …', …]."""
        return [ref.describe() for ref in self.live_references(digest) if ref.kind != 'alias']

    def describe(self, record, aliases=None):
        """A record plus its aliases, references and last use, for results."""
        digest = record['digest']
        path = self.image_path(digest)
        refs = self.live_references(digest)
        info = dict(record)
        info['aliases'] = sorted(r.key for r in refs if r.kind == 'alias')
        info['path'] = path
        info['disk'] = os.path.join(path, DISK)
        info['layer'] = os.path.join(path, LAYER)
        info['machine_path'] = os.path.join(path, MACHINE)
        info['instances'] = len([r for r in refs if r.kind == 'instance'])
        info['last_used'] = iso_time(self.references().last_used(digest)) or record.get('last_used')
        return info

    def usage(self):
        records = list(self.iter_records())
        return {
            'images': len(records),
            'aliases': len(_listdir(self.aliases_dir, 'image names (aliases)')),
            'apparent_size': sum(r.get('apparent_size', 0) for r in records),
            'allocated_size': sum(r.get('allocated_size', 0) for r in records),
            'virtual_size': sum(r.get('virtual_size', 0) for r in records),
        }

    def image_allocated(self, digest):
        path = self.image_path(digest)
        return sum(allocated_bytes(os.path.join(path, n)) for n in MEMBER_NAMES)

    # ------------------------------------------------------------ changes (store lock held)

    def set_alias(self, alias, digest, source, checksum):
        """Point ``alias`` at ``digest``; returns whether its entry changed.
        The new reference is written before the alias, the old one dropped
        after: a crash can leave one reference too many, never too few."""
        entry = self.get_alias(alias)
        if entry is not None and entry.get('digest') == digest and entry.get('source') == source \
                and entry.get('checksum') == checksum:
            self.refs.add(digest, 'alias', alias)
            return False
        self.refs.add(digest, 'alias', alias)
        write_json_atomic(os.path.join(self.aliases_dir, key_name(alias) + '.json'), {
            'alias': alias, 'digest': digest, 'source': source, 'checksum': checksum, 'updated_at': now(),
        })
        if entry is not None and entry.get('digest') != digest:
            self.refs.remove(entry['digest'], 'alias', alias)
        return True

    def lease(self, digest):
        """A Lease on ``digest`` (an operation is using it; prune keeps it),
        taken under the store lock; NotFoundError when it is gone."""
        with self.lock():
            if self.get_record(digest) is None:
                raise self._not_found(digest)
            return self.refs.lease(digest)

    def touch(self, digest):
        """Record a use of the image; callers hold the store lock."""
        if self.get_record(digest) is not None:
            self.refs.touch(digest)

    def commit(self, work, digest, alias, source, checksum):
        """Make the validated image in WorkFolder ``work`` (its files
        read-only, its record written) the image ``digest`` and point
        ``alias`` at it.  Returns (committed, alias_changed): an image
        another process committed meanwhile is kept, ``work`` discarded."""
        with self.lock():
            target = self.image_path(digest)
            committed = False
            if not os.path.isdir(target):
                work.commit(target)
                committed = True
            else:
                work.discard()
            try:
                alias_changed = self.set_alias(alias, digest, source, checksum)
                self.refs.touch(digest)
            except BaseException:
                if committed:
                    # Without its alias the new image is debris: nothing can
                    # refer to it yet (the store lock is held), so it goes,
                    # and the store is as it was.
                    self.remove_image_locked(digest)
                raise
        return committed, alias_changed

    # ------------------------------------------------------------ removal

    def _holder_exists(self, digest, ref):
        """Whether a reference's holder still refers to ``digest`` (drops
        the extra references a killed process may have left)."""
        if ref.kind == 'alias':
            entry = read_json(os.path.join(self.aliases_dir, key_name(ref.key) + '.json'))
            return isinstance(entry, dict) and entry.get('digest') == digest
        if ref.kind == 'instance':
            record = read_json(os.path.join(self.instances_dir, ref.key, INSTANCE_RECORD)) \
                if '/' not in ref.key and not ref.key.startswith('.') else None
            return isinstance(record, dict) and record.get('digest') == digest
        return True

    def drop_stale_references(self, digest):
        """Remove the references to ``digest`` whose holder is gone (store lock held)."""
        if self.format() < STORE_FORMAT:
            return
        for ref in self.refs.of(digest):
            if not self._holder_exists(digest, ref):
                self.refs.remove(digest, ref.kind, ref.key)

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
            self.drop_alias_locked(alias, digest)
            if removes_image:
                self.drop_stale_references(digest)
                self.remove_image_locked(digest)
            return True, digest if removes_image else None

    def remove_image(self, digest, check_mode=False):
        """Remove the image ``digest`` and every alias pointing at it.

        Returns (changed, aliases removed).  Refuses, naming the users, while
        instances or child images need it.
        """
        if parse_digest(digest) is None:
            raise StoreError('not a sha256 digest: %r' % (digest,))
        with os_errors('remove image %s from store' % digest, self.root, StoreError):
            with self.lock(exclusive=not check_mode):
                if self.get_record(digest) is None:
                    return False, []
                users = self.users(digest)
                if users:
                    raise ImageInUseError('image %s is in use by %s; remove those first' % (digest, ', '.join(users)))
                aliases = sorted(a for a, e in self.aliases().items() if e.get('digest') == digest)
                if check_mode:
                    return True, aliases
                for alias in aliases:
                    self.drop_alias_locked(alias, digest)
                self.drop_stale_references(digest)
                self.remove_image_locked(digest)
                return True, aliases

    def drop_alias_locked(self, alias, digest):
        """Remove ``alias`` (pointing at ``digest``), then its reference."""
        try:
            os.unlink(os.path.join(self.aliases_dir, key_name(alias) + '.json'))
        except FileNotFoundError:
            pass
        fsync_dir(self.aliases_dir)
        self.refs.remove(digest, 'alias', alias)

    def remove_image_locked(self, digest):
        """Out of images/ in one rename (the image vanishes atomically), then
        deleted; a crash in between leaves trash that collect() removes."""
        self.staging.trash(self.image_path(digest))
        self.refs.forget(digest)
