# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Garbage collection of a store: a mark and sweep over its references.

Roots (an image reached from one is kept, and so is every ancestor of a kept
image):

* an alias, unless ``unused_for`` expires it (the image was not used for that
  long) or ``keep_below`` needs the room (least recently used first);
* an instance, a child image, a mutable image built on it, a pin;
* a lease: an operation (an instance being created) holding the image at
  this moment;
* a live process holding one of its files (a running VM: QEMU's image locks
  and open descriptors), which also counts as a use now;
* ``keep`` (aliases or digests), and images younger than ``min_age``.

The whole decision and the removals happen under the store lock, which every
fetch commit, alias change, lease and instance commit also takes: nothing
can start using an image between the moment it is judged unreferenced and
its removal.  ``plan_prune()`` only reads, so check mode returns exactly the
plan a real run applies with ``apply_prune()``.  Removal is leaf first,
through the staging protocol (one rename into the trash, then deletion), and
the bytes freed are measured on disk.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re
import time

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import InvalidOptionError
from ansible_collections.vmimage.qemu.plugins.module_utils._core.layout import DISK, LAYER, key_name
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.image_locks import usage_reports
from ansible_collections.vmimage.qemu.plugins.module_utils._store.references import iso_time, posix_time
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import parse_digest

DEFAULT_MIN_AGE = 3600
_DURATION = re.compile(r'^\s*(\d+)\s*([smhd]?)\s*$')
_DURATION_UNITS = {'': 1, 's': 1, 'm': 60, 'h': 3600, 'd': 86400}
_SIZE = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|%)?\s*$')
_SIZE_UNITS = {None: 1, 'B': 1, 'KiB': 1024, 'MiB': 1024 ** 2, 'GiB': 1024 ** 3, 'TiB': 1024 ** 4}


def parse_duration(value, name):
    """Seconds from an integer or a string with s, m, h or d."""
    if isinstance(value, bool):
        raise InvalidOptionError('%s must be a duration (seconds, or a number with s, m, h or d), got %r'
                                 % (name, value))
    if isinstance(value, int):
        if value < 0:
            raise InvalidOptionError('%s must not be negative, got %d' % (name, value))
        return value
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidOptionError('%s must be a duration (seconds, or a number with s, m, h or d, like 30d), got %r'
                                 % (name, value))
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value, name, filesystem_bytes=None):
    """Bytes from an integer, an IEC string (KiB ... TiB) or a percentage of
    ``filesystem_bytes`` (the store's file system)."""
    if isinstance(value, bool):
        raise InvalidOptionError('%s must be a size, got %r' % (name, value))
    if isinstance(value, int):
        if value < 0:
            raise InvalidOptionError('%s must not be negative, got %d' % (name, value))
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidOptionError('%s must be bytes, a size with KiB, MiB, GiB or TiB (like 200GiB), or a percentage '
                                 'of the file system (like 80%%), got %r' % (name, value))
    number, unit = float(match.group(1)), match.group(2)
    if unit == '%':
        if number > 100:
            raise InvalidOptionError('%s must be at most 100%%, got %r' % (name, value))
        return int(filesystem_bytes * number / 100)
    return int(number * _SIZE_UNITS[unit])


def tree_allocated(path):
    """Allocated bytes of ``path`` and everything below it (what du counts),
    folders included; 0 when it does not exist."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not os.path.isdir(path) or os.path.islink(path):
        return st.st_blocks * 512
    total = 0
    seen = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in filenames]:
            try:
                st = os.lstat(name)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return total


class PrunePolicy(object):
    """What to remove; see the module doc.  Durations in seconds, sizes in
    bytes (already resolved against the file system)."""

    __slots__ = ('unreferenced', 'unused_for', 'keep_below', 'keep', 'min_age')

    def __init__(self, unreferenced=True, unused_for=None, keep_below=None, keep=(), min_age=DEFAULT_MIN_AGE):
        self.unreferenced = unreferenced
        self.unused_for = unused_for
        self.keep_below = keep_below
        self.keep = tuple(keep or ())
        self.min_age = min_age

    @classmethod
    def from_options(cls, store_root, unreferenced=True, unused_for=None, keep_below=None, keep=None,
                     min_age=DEFAULT_MIN_AGE):
        fs_bytes = None
        if isinstance(keep_below, str) and keep_below.strip().endswith('%'):
            st = os.statvfs(store_root)
            fs_bytes = st.f_blocks * st.f_frsize
        for ref in keep or ():
            if not isinstance(ref, str) or not ref:
                raise InvalidOptionError('keep must list aliases or sha256:<hex> digests, got %r' % (ref,))
        return cls(unreferenced=bool(unreferenced),
                   unused_for=None if unused_for is None else parse_duration(unused_for, 'unused_for'),
                   keep_below=None if keep_below is None else parse_size(keep_below, 'keep_below', fs_bytes),
                   keep=keep or (), min_age=parse_duration(min_age, 'min_age'))


class ImageVerdict(object):
    """One image's fate: ``digest``, its ``aliases``, ``bytes`` (allocated on
    disk, what removing it frees), ``reason`` and whether it is ``removed``."""

    __slots__ = ('digest', 'aliases', 'bytes', 'reason', 'removed', 'last_used', 'parent')

    def __init__(self, digest, aliases, size, reason, removed, last_used, parent):
        self.digest = digest
        self.aliases = aliases
        self.bytes = size
        self.reason = reason
        self.removed = removed
        self.last_used = last_used
        self.parent = parent

    def as_dict(self):
        return dict(digest=self.digest, aliases=list(self.aliases), bytes=self.bytes, reason=self.reason,
                    last_used=iso_time(self.last_used))


class PrunePlan(object):
    """The decision: ``verdicts`` in removal order first (leaf first), then
    the kept ones; ``usage_before`` (allocated bytes of the store folder);
    ``touched`` the images found in use by live processes."""

    __slots__ = ('verdicts', 'usage_before', 'touched')

    def __init__(self, verdicts, usage_before, touched):
        self.verdicts = verdicts
        self.usage_before = usage_before
        self.touched = touched

    @property
    def removed(self):
        return [v for v in self.verdicts if v.removed]

    @property
    def kept(self):
        return [v for v in self.verdicts if not v.removed]

    @property
    def freed_bytes(self):
        return sum(v.bytes for v in self.removed)


def _image_bytes(store, digest, aliases):
    """What removing the image frees: its folder, its records, its aliases."""
    total = tree_allocated(store.image_path(digest)) + tree_allocated(os.path.join(store.refs_dir, digest[7:]))
    for alias in aliases:
        total += tree_allocated(os.path.join(store.aliases_dir, key_name(alias) + '.json'))
    return total


def _held_images(store, digests):
    """The digests whose files a live process holds (a running VM), with
    the holders' description, from one pass over /proc."""
    files = {}
    for digest in digests:
        path = store.image_path(digest)
        for name in (DISK, LAYER):
            files[os.path.join(path, name)] = digest
    held = {}
    for path, (in_use, holders, _locks) in usage_reports(list(files)).items():
        if in_use:
            who = ', '.join('pid %s (%s)' % (h['pid'], h['command']) for h in holders if h.get('pid')) \
                or 'a process this user cannot inspect'
            held.setdefault(files[path], who)
    return held


def plan_prune(store, policy, now=None, debris_grace=3600):
    """The PrunePlan for ``policy`` (reads only; call with the store lock held)."""
    now = time.time() if now is None else now
    records = dict((r['digest'], r) for r in store.iter_records() if parse_digest(r.get('digest')))
    held = _held_images(store, records)
    keep = set()
    for ref in policy.keep:
        if parse_digest(ref):
            keep.add(ref)
        else:
            entry = store.get_alias(ref)
            if entry is not None:
                keep.add(entry['digest'])

    info = {}
    for digest, record in records.items():
        refs = store.live_references(digest)
        last = store.references().last_used(digest)
        if digest in held:
            last = now  # a VM running for a month keeps its image recent
        fetched = posix_time(record.get('fetched_at'))
        info[digest] = dict(
            aliases=sorted(r.key for r in refs if r.kind == 'alias'),
            others=[r for r in refs if r.kind != 'alias'],
            leased=store.refs.leased(digest),
            last=last if last is not None else fetched,
            age=None if fetched is None else now - fetched,
            parent=record.get('parent') if record.get('parent') in records else None,
        )

    # Hard roots: never removed by any policy.
    reasons = {}
    for digest, item in info.items():
        if digest in keep:
            reasons[digest] = 'in keep'
        elif item['others']:
            reasons[digest] = ', '.join(r.describe() for r in item['others'])
        elif digest in held:
            reasons[digest] = 'held by ' + held[digest]
        elif item['leased']:
            reasons[digest] = 'in use by a running operation'
        elif item['age'] is not None and item['age'] < policy.min_age:
            reasons[digest] = 'younger than min_age'
    # Aliases are roots unless a policy expires them.
    soft = {}
    for digest, item in info.items():
        if digest in reasons or not item['aliases']:
            continue
        if policy.unused_for is not None and item['last'] is not None and now - item['last'] >= policy.unused_for:
            continue  # expired: no longer a root
        soft[digest] = 'alias ' + ', '.join(item['aliases'])

    def mark(roots):
        """Roots and their ancestors."""
        marked = {}
        for digest, reason in roots.items():
            marked.setdefault(digest, reason)
            child, parent = digest, info[digest]['parent']
            while parent is not None and parent not in marked:
                marked[parent] = 'parent of %s' % child
                child, parent = parent, info[parent]['parent']
        return marked

    marked = mark(dict(list(soft.items()) + list(reasons.items())))
    removed = {}
    for digest, item in info.items():
        if digest in marked:
            continue
        if item['aliases']:
            removed[digest] = 'not used for %s (alias %s)' % (_duration(policy.unused_for), ', '.join(item['aliases']))
        elif policy.unreferenced:
            removed[digest] = 'unreferenced'
        else:
            marked[digest] = 'unreferenced, but unreferenced is false'

    sizes = dict((digest, _image_bytes(store, digest, info[digest]['aliases'])) for digest in info)
    usage_before = tree_allocated(store.root)
    if policy.keep_below is not None:
        usage = usage_before - sum(sizes[d] for d in removed)
        # Least recently used first, among what only an alias keeps.
        hard = mark(reasons)
        candidates = sorted((d for d in marked if d in soft and d not in hard),
                            key=lambda d: (info[d]['last'] or 0, d))
        for digest in candidates:
            if usage <= policy.keep_below:
                break
            if any(info[d]['parent'] == digest and d not in removed for d in info):
                continue  # a kept child still needs it
            removed[digest] = 'over keep_below, least recently used (alias %s)' % ', '.join(info[digest]['aliases'])
            del marked[digest]
            usage -= sizes[digest]
        for digest in marked:
            if marked[digest] == soft.get(digest) and usage <= policy.keep_below:
                marked[digest] = '%s, within budget' % marked[digest]

    verdicts = []
    for digest, path in store.incomplete_images():
        try:
            age = now - os.lstat(path).st_mtime
        except OSError:
            continue
        size = tree_allocated(path) + tree_allocated(os.path.join(store.refs_dir, digest[7:]))
        if age >= debris_grace:
            verdicts.append(ImageVerdict(digest, [], size, 'incomplete image (no valid record)', True, None, None))
        else:
            verdicts.append(ImageVerdict(digest, [], size, 'incomplete image younger than debris_grace', False,
                                         None, None))
    for digest in _leaf_first(removed, info):
        item = info[digest]
        verdicts.append(ImageVerdict(digest, item['aliases'], sizes[digest], removed[digest], True, item['last'],
                                     item['parent']))
    for digest in sorted(marked):
        item = info[digest]
        verdicts.append(ImageVerdict(digest, item['aliases'], sizes[digest], marked[digest], False, item['last'],
                                     item['parent']))
    return PrunePlan(verdicts, usage_before, sorted(held))


def _leaf_first(removed, info):
    """Removal order: an image before its parent."""
    order = []
    pending = set(removed)
    while pending:
        leaves = sorted(d for d in pending if not any(info[c]['parent'] == d for c in pending))
        if not leaves:  # a cycle cannot be built, but never loop on one
            leaves = sorted(pending)
        order.extend(leaves)
        pending.difference_update(leaves)
    return order


def _duration(seconds):
    if seconds is None:
        return 'long'
    for unit, size in (('d', 86400), ('h', 3600), ('m', 60)):
        if seconds % size == 0 and seconds >= size:
            return '%d%s' % (seconds // size, unit)
    return '%ds' % seconds


def apply_prune(store, plan):
    """Remove what ``plan`` removes (store lock held), leaf first, each
    image's aliases with it (never a dangling alias); record a use of the
    images live processes hold.  Returns the store's allocated bytes after."""
    for digest in plan.touched:
        store.refs.touch(digest)
    for verdict in plan.removed:
        for alias in verdict.aliases:
            store.drop_alias_locked(alias, verdict.digest)
        store.remove_image_locked(verdict.digest)
    return tree_allocated(store.root)


def prune_store(store, policy, check_mode=False, debris_grace=3600, now=None):
    """Collect debris, plan and (unless ``check_mode``) apply, all under
    the store lock.  Returns (plan, usage_after, collected)."""
    with store.lock(exclusive=True):
        collected = [] if check_mode else store.collect(grace=debris_grace)
        plan = plan_prune(store, policy, now=now, debris_grace=debris_grace)
        if check_mode:
            return plan, plan.usage_before - plan.freed_bytes, collected
        usage_after = apply_prune(store, plan)
        return plan, usage_after, collected
