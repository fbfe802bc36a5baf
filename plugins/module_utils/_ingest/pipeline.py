# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Fetching an image into a store: plan, then ingest, then commit.

* ``plan_fetch()`` decides once, without writing: the image is already there
  (by digest, or by the alias's source and checksum) or it must be downloaded.
  Check mode returns that plan; a real run applies it.
* ``ingest()`` is containerd's ingest: in a WorkFolder of the store's staging
  area it downloads, hashes, decompresses and extracts in one pass (the
  archive is never written whole), restarts when the server cannot resume,
  verifies the digest, validates the image, writes its record and makes it
  read-only.  The result is a verified staging folder and nothing else.
* the store then only commits it (``ImageStore.commit``).

One fetch per key at a time (lima's downloader): the per-key lock is taken
before the download and the plan is made again once it is won, so N
processes asking for one image cause one download.  A FetchRequest carries
every option as one value.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.reader import extract_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import StoreError, os_errors
from ansible_collections.vmimage.qemu.plugins.module_utils._core.fs import write_json_atomic
from ansible_collections.vmimage.qemu.plugins.module_utils._core.layout import (
    DISK, IMAGE_RECORD, LAYER, MACHINE, MEMBER_NAMES, now,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.staging import fsync_dir, remove_tree
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.validator import (
    VALIDATOR_VERSION, validate_image_folder,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import (
    RECORD_FORMAT, FetchResult, check_alias,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._transfer.checksum import (
    parse_checksum, resolve_checksum, verify_digest,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._transfer.download import (
    MAX_RESTARTS, DownloadRestartRequired, check_mirrors, fetch_first, redact_url, restarts_exhausted,
)

_DRAIN = 1024 * 1024


class FetchRequest(object):
    """Everything a fetch needs, checked: ``url`` (with its credentials),
    ``source`` (the URL as results show it), ``alias``, ``spec`` (a
    ChecksumSpec or None) and ``checksum`` (its text), ``mirrors``,
    ``force``, and ``download`` (open_download() keywords: retries, timeout,
    credentials, TLS, ...)."""

    __slots__ = ('url', 'source', 'alias', 'spec', 'checksum', 'mirrors', 'force', 'download')

    def __init__(self, url, mirrors=(), checksum=None, alias=None, force=False, download=None):
        self.url = url
        self.source = redact_url(url)
        self.alias = check_alias(alias or 'url:' + self.source)
        self.spec = parse_checksum(checksum) if checksum else None
        self.checksum = checksum or None
        self.mirrors = check_mirrors(mirrors)
        self.force = force
        self.download = dict(download or {})
        # The credentials and headers in ``download`` are those of ``url``:
        # they reach a mirror or the checksum file only on the same origin.
        self.download.setdefault('credentials_origin', url)

    @property
    def key(self):
        """What one download serves: the digest when it is known, else the alias."""
        if self.spec is not None and self.spec.hexdigest:
            return 'digest:%s:%s' % (self.spec.algorithm, self.spec.hexdigest)
        return 'alias:' + self.alias


class FetchPlan(object):
    """The decision: ``action`` 'use' (``digest`` is already in the store)
    or 'download'; ``previous_digest`` what the alias points at now."""

    __slots__ = ('action', 'digest', 'previous_digest', 'alias_changes')

    def __init__(self, action, digest, previous_digest, alias_changes):
        self.action = action
        self.digest = digest
        self.previous_digest = previous_digest
        self.alias_changes = alias_changes

    @property
    def changed(self):
        return self.action == 'download' or self.alias_changes

    def result(self, store, request):
        """The FetchResult a check-mode run returns."""
        record = store.get_record(self.digest) if self.digest else None
        return FetchResult(self.changed, False, self.digest, request.alias, record, request.source,
                           self.previous_digest)


class IngestedImage(object):
    """A verified, validated image in a WorkFolder, ready to commit."""

    __slots__ = ('work', 'digest', 'source', 'attempts', 'restarts', 'resumed')

    def __init__(self, work, digest, source, attempts, restarts, resumed):
        self.work = work
        self.digest = digest
        self.source = source
        self.attempts = attempts
        self.restarts = restarts
        self.resumed = resumed


def _present(store, request):
    """The digest already satisfying ``request`` without any network, or None."""
    if request.spec is not None and request.spec.hexdigest:
        return store.find_by_digest(request.spec.algorithm, request.spec.hexdigest)
    entry = store.get_alias(request.alias)
    if entry is None or entry.get('source') != request.source or entry.get('checksum') != request.checksum:
        return None
    if store.get_record(entry['digest']) is None:
        return None
    return entry['digest']


def plan_fetch(store, request):
    """The FetchPlan for ``request`` (reads only)."""
    entry = store.get_alias(request.alias)
    previous = entry['digest'] if entry else None
    digest = None if request.force else _present(store, request)
    if digest is None:
        return FetchPlan('download', None, previous, True)
    alias_changes = entry is None or entry.get('digest') != digest
    return FetchPlan('use', digest, previous, alias_changes)


def _use(store, request, plan):
    with store.lock():
        store.set_alias(request.alias, plan.digest, request.source, request.checksum)
        store.touch(plan.digest)
    return FetchResult(plan.changed, False, plan.digest, request.alias, store.get_record(plan.digest),
                       request.source, plan.previous_digest)


def _extract(stream, folder, limits):
    """Extract the archive ``stream`` delivers into ``folder``, starting
    over when the stream had to restart from byte 0.  Returns the restarts."""
    restarts = 0
    while True:
        os.mkdir(folder, 0o700)
        try:
            with os_errors('extract %s into' % stream.source, folder, StoreError):
                extract_image_archive(stream, folder, limits=limits, fsync=True)
            # The tar ended; anything left must still be hashed (and be
            # empty), and may be cut off as well.
            while stream.read(_DRAIN):
                pass
            return restarts
        except DownloadRestartRequired as exc:
            restarts += 1
            remove_tree(folder)
            if restarts > MAX_RESTARTS:
                raise restarts_exhausted(stream.source, MAX_RESTARTS, exc)


def ingest(store, request):
    """Download, verify and validate ``request`` into a WorkFolder of the
    store's staging area.  Returns an IngestedImage; on any failure the
    folder is gone and the error propagates."""
    download = dict(request.download)
    expected = request.spec
    if expected is not None and expected.url:
        expected = resolve_checksum(expected, request.url, **download)
    algorithms = ['sha256']
    if expected is not None and expected.algorithm not in algorithms:
        algorithms.append(expected.algorithm)
    work = store.staging.new('fetch')
    try:
        stream = fetch_first(list(request.mirrors) + [request.url], hash_algorithms=tuple(algorithms),
                             max_bytes=store.limits.max_compressed_bytes, **download)
        try:
            folder = os.path.join(work.path, 'image')
            restarts = _extract(stream, folder, store.limits)
            digests = dict((algo, stream.hexdigest(algo)) for algo in algorithms)
            source, attempts, resumed = stream.source, stream.attempts, stream.resumed
        finally:
            stream.close()
        if expected is not None:
            verify_digest(expected, digests[expected.algorithm], source)
        digest = 'sha256:' + digests['sha256']
        info = validate_image_folder(folder, limits=store.limits, use_qemu_img=store.use_qemu_img)
        record = {
            'format': RECORD_FORMAT,
            'digest': digest,
            'digests': digests,
            'source': source,
            'fetched_at': now(),
            'last_used': now(),
            'apparent_size': sum(os.path.getsize(os.path.join(folder, n)) for n in MEMBER_NAMES),
            'allocated_size': info.allocated_size,
            'virtual_size': info.virtual_size,
            'disk_size': info.disk_size,
            'validator_version': VALIDATOR_VERSION,
            'machine': info.machine,
            'parent': None,
        }
        write_json_atomic(os.path.join(folder, IMAGE_RECORD), record, mode=0o444)
        for name in (DISK, LAYER, MACHINE):
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)
        fsync_dir(folder)
        return IngestedImage(_Committable(work, folder), digest, source, attempts, restarts, resumed)
    except BaseException:
        work.discard()
        raise


class _Committable(object):
    """The image folder inside a WorkFolder, committed by its own rename
    (the WorkFolder keeps owning the rest until it is discarded)."""

    def __init__(self, work, folder):
        self.work = work
        self.folder = folder

    def commit(self, target):
        fsync_dir(self.folder)
        os.rename(self.folder, target)
        fsync_dir(os.path.dirname(target))
        self.work.discard()

    def discard(self):
        self.work.discard()


def fetch_image(store, url, mirrors=(), checksum=None, alias=None, force=False, check_mode=False,
                retries=8, timeout=30, download_options=None, sleep=None):
    """Make ``alias`` point at the image from ``url``; download only if needed.

    Returns a FetchResult.  With check_mode nothing is written and nothing
    downloaded; ``changed`` says what a real run would do.  ``mirrors`` are
    URLs or dicts with their own credentials (download.check_mirrors).
    """
    download = dict(download_options or {})
    download.update(retries=retries, timeout=timeout)
    if sleep is not None:
        download['sleep'] = sleep
    request = FetchRequest(url, mirrors=mirrors, checksum=checksum, alias=alias, force=force, download=download)
    with os_errors('fetch %s into store' % request.source, store.root, StoreError):
        return run_fetch(store, request, check_mode)


def run_fetch(store, request, check_mode=False):
    """Plan ``request``; in check mode return the plan, else apply it."""
    plan = plan_fetch(store, request)
    if check_mode:
        return plan.result(store, request)
    if plan.action == 'use':
        return _use(store, request, plan)
    with store.key_lock(request.key):
        # Another process may have committed it while we waited.
        plan = plan_fetch(store, request)
        if plan.action == 'use':
            return _use(store, request, plan)
        store.collect()
        ingested = ingest(store, request)
        try:
            committed, alias_changed = store.commit(ingested.work, ingested.digest, request.alias,
                                                    request.source, request.checksum)
        finally:
            ingested.work.discard()
    changed = committed or alias_changed and plan.previous_digest != ingested.digest
    return FetchResult(changed, True, ingested.digest, request.alias, store.get_record(ingested.digest),
                       ingested.source, plan.previous_digest, ingested.attempts, ingested.restarts,
                       ingested.resumed)
