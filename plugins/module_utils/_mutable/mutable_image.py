# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Mutable images: a folder an image builder boots and writes, packed into
a deterministic ``image.tar.zst``.

A mutable image folder holds ``disk.img`` (raw, sparse; the VM writes it
directly) and ``machine.json`` (validated, version 1).  ``layer.qcow2`` is
derived: packing writes the canonical empty overlay (backing ``disk.img``,
format raw, as the original packager did), packs the three files and removes
it again, so the folder is the same after a pack, failed or not.

What the original MutableImage got wrong and this does not:

* in use is not a flag in one process's memory: a QEMU that has the disk open
  holds its image lock, which every process can see (qemu_locks), so packing
  or disposing under a running VM is refused whoever started it;
* every write goes through the collection's one crash-safety protocol
  (staging.WorkArea, prefix WORK_PREFIX): a new image is built in a work folder
  beside ``path`` and appears by one rename, the archive is written in a work
  folder beside the destination and renamed onto it only when complete, and a
  removed image is renamed into the work area before it is deleted.  Any
  failure discards the work folder; a killed task leaves only work folders
  whose lock died with it, which the next run beside them collects, so there
  is never a partial archive, a half image or leftover debris;
* each operation decides once: plan_create, plan_package and plan_dispose say
  what would happen and why; check mode returns the plan and a real run
  applies exactly the plan it made under the folder lock;
* packing is deterministic (fixed tar metadata, canonical layer, zstd in
  multi-threaded mode), so packing the same folder twice gives the same bytes.

Idempotence without reading the disk: after a pack, a sidecar
``<dest>.vmimage.json`` records the archive's digest and identity (inode,
size, mtime) and a fingerprint of what was packed (disk.img's inode, size,
mtime and ctime; machine.json's hash; level; qemu-img and zstd versions).  A
later pack that finds the same fingerprint and the same destination file
returns at once: a few stat calls, no compression and no read of the disk.
ctime cannot be set back by users, so a rewritten disk never matches; a disk
written within the file system's timestamp granularity of the fingerprint is
"racy" (as in git's index) and is repacked and compared instead of trusted.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time

from ansible_collections.vmimage.qemu.plugins.module_utils._core.fs import fsync_dir, write_json_atomic
from ansible_collections.vmimage.qemu.plugins.module_utils._core.layout import WORK_PREFIX
from ansible_collections.vmimage.qemu.plugins.module_utils._core.locks import FileLock
from ansible_collections.vmimage.qemu.plugins.module_utils._core.staging import WorkArea, remove_tree
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import (
    DISK, LAYER, MACHINE, write_image_archive,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    InvalidOptionError, LimitExceededError, LockTimeoutError, NotFoundError, VmImageError, os_error,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import DEFAULT_LIMITS, GIB
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.validator import load_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.machine import (
    MACHINE_SCHEMA_VERSION, apply_defaults, dump_machine_json, load_machine_json,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.qemu_img import create_overlay, find_qemu_img
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.image_locks import ensure_not_in_use
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.zstd_codec import zstd_module

FORMAT = 'raw'
DEFAULT_MAX_SIZE_GIB = 80  # the original's limit for blank images
DEFAULT_LEVEL = 3
MIN_LEVEL = 1
MAX_LEVEL = 19
SIDECAR_SUFFIX = '.vmimage.json'
SIDECAR_FORMAT = 1
# Bump when packing the same inputs would give different bytes (member
# order, tar metadata, layer options): old sidecars then stop matching.
PACK_FORMAT = 1
# The overlay the original packager wrote: qemu-img create -f qcow2
# -o backing_file=disk.img,backing_fmt=raw,lazy_refcounts=on.
LAYER_OPTIONS = {'lazy_refcounts': 'on'}
SECTOR = 512
MAX_SIDECAR = 64 * 1024
# Names inside a pack's work folder: the archive and its sidecar are written
# there and renamed onto dest and <dest>.vmimage.json.
WORK_ARCHIVE = 'archive'
WORK_SIDECAR = 'sidecar.json'
# Earlier versions wrote <dest>.tmp-* beside dest, flock-ed while written: one
# nobody holds a lock on and that has not been written for this long is dead
# (the lock decides; the age only closes the window between creating the file
# and locking it).
STALE_TMP_AGE = 60
# Earlier versions also left folders without any lock (mkdtemp staging of a
# new image, a .removing-* rename of a disposed one): nothing tells a live
# one from a dead one but time, so only those untouched for this long, named
# exactly as those versions named them, are removed.
LEGACY_GRACE = 3600
_MKTEMP_SUFFIX = re.compile(r'[a-z0-9_]{8}\Z')   # tempfile's random part
_REMOVING_SUFFIX = re.compile(r'[0-9a-f]{12}\Z')
# Timestamps of Linux file systems are at most a tick (<= 10 ms) coarse;
# whole-second timestamps (ext3 small inodes, some network file systems)
# are treated as 2 s coarse, like FAT.
_FINE_GRANULARITY_NS = 20 * 1000 * 1000
_COARSE_GRANULARITY_NS = 2 * 1000 * 1000 * 1000
_READ_CHUNK = 1024 * 1024
_OWN_TEMP_PREFIXES = ('.pack-layer-', '..pack-layer-', '.' + LAYER + '.')


def _umask():
    """The process umask, read without changing it: setting it to read it
    would briefly give files that other threads create the wrong mode."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _file_mode():
    return 0o666 & ~_umask()


def _dir_mode():
    return 0o777 & ~_umask()


def _error(action, path, exc):
    """A VmImageError saying what failed on which path, from an OSError:
    NoSpaceError, PermissionDeniedError, or a plain VmImageError."""
    return os_error(exc, action, path)


def check_level(level):
    try:
        level = int(level)
    except (TypeError, ValueError):
        raise InvalidOptionError('compression_level must be an integer between %d and %d, got %r'
                                 % (MIN_LEVEL, MAX_LEVEL, level))
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise InvalidOptionError('compression_level must be between %d and %d, got %d'
                                 % (MIN_LEVEL, MAX_LEVEL, level))
    return level


def check_max_size_gib(max_size_gib):
    if isinstance(max_size_gib, bool) or not isinstance(max_size_gib, int) or max_size_gib < 1:
        raise InvalidOptionError('max_size_gib must be a whole number of GiB, at least 1, got %r' % (max_size_gib,))
    return max_size_gib


def check_package_options(state, dest=None, compression_level=DEFAULT_LEVEL, max_size_gib=DEFAULT_MAX_SIZE_GIB):
    """The checks of vm_image_package's options that its argument spec
    cannot express; InvalidOptionError naming the option."""
    check_level(compression_level)
    check_max_size_gib(max_size_gib)
    if state == 'absent' and dest is not None:
        raise InvalidOptionError('dest is only used with state=present: packing needs the image, which '
                                 'state=absent removes')


def blank_machine(machine=None):
    """The machine a blank image gets: ``machine`` (version 1 assumed when
    missing) validated, with the defaults filled in; never a uuid or mac it
    was not given, so images do not hand one identity to every VM."""
    if machine is None:
        machine = {}
    if not isinstance(machine, dict):
        # validate_machine names the problem in the usual words.
        return apply_defaults(machine)
    machine = dict(machine)
    machine.setdefault('version', MACHINE_SCHEMA_VERSION)
    return apply_defaults(machine)


def check_size_gib(size_gib, max_size_gib=DEFAULT_MAX_SIZE_GIB):
    if isinstance(size_gib, bool) or not isinstance(size_gib, int):
        raise InvalidOptionError('size_gib must be a whole number of GiB, got %r' % (size_gib,))
    if size_gib < 1:
        raise InvalidOptionError('size_gib must be at least 1, got %d' % size_gib)
    if size_gib > max_size_gib:
        raise LimitExceededError('size_gib %d is more than the limit of %d GiB (max_size_gib)'
                                 % (size_gib, max_size_gib))
    return size_gib


def sidecar_path(dest):
    return dest + SIDECAR_SUFFIX


# ---------------------------------------------------------------- results

class SourceState(object):
    """What a pack reads from the folder, taken once and compared after."""

    __slots__ = ('disk_stat', 'machine_bytes', 'machine')

    def __init__(self, disk_stat, machine_bytes, machine):
        self.disk_stat = disk_stat
        self.machine_bytes = machine_bytes
        self.machine = machine

    @property
    def disk_size(self):
        return self.disk_stat.st_size

    def disk_identity(self):
        st = self.disk_stat
        return {'dev': st.st_dev, 'ino': st.st_ino, 'size': st.st_size,
                'mtime_ns': st.st_mtime_ns, 'ctime_ns': st.st_ctime_ns}


class CreatePlan(object):
    """What creating a missing mutable image will do, decided once: check
    mode reports it, MutableImage.create() applies it.

    source:  'blank' or 'archive'
    machine: the validated machine of a blank image (None from an archive:
             only extracting it tells, and check mode does not)
    """

    __slots__ = ('path', 'source', 'size_gib', 'machine', 'machine_bytes', 'archive', 'use_qemu_img')

    def __init__(self, path, source, size_gib=None, machine=None, machine_bytes=None, archive=None,
                 use_qemu_img=True):
        self.path = path
        self.source = source
        self.size_gib = size_gib
        self.machine = machine
        self.machine_bytes = machine_bytes
        self.archive = archive
        self.use_qemu_img = use_qemu_img

    @property
    def disk_size(self):
        return self.size_gib * GIB if self.size_gib is not None else None


class PackPlan(object):
    """What packing to ``dest`` will do, decided once from the folder, the
    sidecar and dest (under the folder lock in a real run).

    action: 'keep'   the sidecar vouches for dest: nothing to compress;
            'verify' the fingerprint matches, but is not trusted (force, or a
                     racy disk): pack and compare, most likely no change;
            'pack'   dest is missing, not ours, or out of date.
    reason: why 'verify' or 'pack' (None for 'keep').
    """

    __slots__ = ('dest', 'level', 'force', 'action', 'reason', 'source', 'fingerprint', 'sidecar',
                 'snapshot_ns', 'virtual_size')

    def __init__(self, dest, level, force, action, reason=None, source=None, fingerprint=None, sidecar=None,
                 snapshot_ns=None, virtual_size=None):
        self.dest = dest
        self.level = level
        self.force = force
        self.action = action
        self.reason = reason
        self.source = source
        self.fingerprint = fingerprint
        # Only a sidecar that describes the file now at dest, else None.
        self.sidecar = sidecar
        self.snapshot_ns = snapshot_ns
        self.virtual_size = virtual_size

    @property
    def previous_digest(self):
        return self.sidecar['archive'].get('digest') if self.sidecar else None

    def result(self):
        """The PackageResult the plan predicts (what check mode returns)."""
        if self.action == 'pack':
            return PackageResult(True, False, self.dest, virtual_size=self.virtual_size,
                                 previous_digest=self.previous_digest, reason=self.reason)
        # A matching fingerprint means a pack gives the same bytes, even when
        # forced; if it is racy that is only very likely, but only a real pack
        # can tell, and a prediction does not pack.
        archive = self.sidecar['archive']
        return PackageResult(False, False, self.dest, digest=archive.get('digest'),
                             archive_size=archive.get('identity', {}).get('size'),
                             virtual_size=self.virtual_size, data_bytes=self.sidecar.get('data_bytes'),
                             previous_digest=archive.get('digest'))


class DisposePlan(object):
    """What removing the mutable image will do: ``remove`` is False when
    there is nothing at ``path``; every refusal is raised while planning."""

    __slots__ = ('path', 'remove')

    def __init__(self, path, remove):
        self.path = path
        self.remove = remove


class PackageResult(object):
    """Outcome of MutableImage.package().

    changed: dest got different bytes (or would, in check mode)
    packed:  this call compressed the disk (False when the fingerprint matched)
    digest:  'sha256:<hex>' of dest (None in check mode when a pack is pending)
    reason:  why a pack was (or would be) needed, for diffs and debugging
    """

    __slots__ = ('changed', 'packed', 'dest', 'digest', 'archive_size', 'virtual_size', 'data_bytes',
                 'previous_digest', 'reason')

    def __init__(self, changed, packed, dest, digest=None, archive_size=None, virtual_size=None,
                 data_bytes=None, previous_digest=None, reason=None):
        self.changed = changed
        self.packed = packed
        self.dest = dest
        self.digest = digest
        self.archive_size = archive_size
        self.virtual_size = virtual_size
        self.data_bytes = data_bytes
        self.previous_digest = previous_digest
        self.reason = reason


# ---------------------------------------------------------------- helpers

def _tool_identity(path):
    """Which binary, by path, size and mtime: a package upgrade changes it."""
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def _file_identity(st):
    """What identifies one written archive; ctime is left out because rename
    changes it and the sidecar is written before the archive is renamed."""
    return {'dev': st.st_dev, 'ino': st.st_ino, 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def _granularity_ns(st):
    if st.st_mtime_ns % 1000000000 == 0 and st.st_ctime_ns % 1000000000 == 0:
        return _COARSE_GRANULARITY_NS
    return _FINE_GRANULARITY_NS


def _is_racy(st, snapshot_ns):
    """True when a write right after ``snapshot_ns`` could leave the disk's
    timestamps unchanged, so the fingerprint cannot vouch for the content."""
    newest = max(st.st_mtime_ns, st.st_ctime_ns)
    return newest + _granularity_ns(st) >= snapshot_ns


def _sha256_file(path):
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            chunk = os.read(fd, _READ_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    finally:
        os.close(fd)
    return 'sha256:' + digest.hexdigest()


def _same_bytes(a, b):
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, 'rb') as fa, open(b, 'rb') as fb:
        while True:
            ca = fa.read(_READ_CHUNK)
            if ca != fb.read(_READ_CHUNK):
                return False
            if not ca:
                return True


def _remove_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read_sidecar(dest):
    """The sidecar of ``dest`` as a dict, or None when it is missing,
    unreadable or not ours: then the next pack simply rewrites it."""
    try:
        fd = os.open(sidecar_path(dest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, MAX_SIDECAR + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        data = json.loads(raw.decode('utf-8')) if len(raw) <= MAX_SIDECAR else None
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get('format') != SIDECAR_FORMAT:
        return None
    return data


def _dest_matches(sidecar, dest):
    """The sidecar describes the file now at ``dest`` (same inode, size, mtime)."""
    if not sidecar or not isinstance(sidecar.get('archive'), dict):
        return False
    try:
        st = os.lstat(dest)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    return sidecar['archive'].get('identity') == _file_identity(st)


def _collect_stale_tmp(dest):
    """Remove the <dest>.tmp-* archives earlier versions left when a pack
    died (kill -9, power loss): their flock went with them.  Returns the
    names removed."""
    folder, base = os.path.split(dest)
    prefix = base + '.tmp-'
    removed = []
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith(prefix))
    except OSError:
        return removed
    now = time.time()
    for name in names:
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < STALE_TMP_AGE:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live pack of an earlier version is writing it
            _remove_quietly(path)
            removed.append(name)
        finally:
            os.close(fd)
    return removed


def _idle_since(path):
    """The newest mtime of ``path`` and its entries: a writer adds entries
    to its folder and writes the files in it."""
    newest = os.lstat(path).st_mtime
    for name in os.listdir(path):
        try:
            newest = max(newest, os.lstat(os.path.join(path, name)).st_mtime)
        except OSError:
            pass
    return newest


def _collect_legacy_folders(image_path):
    """Remove the lockless folders earlier versions left beside the mutable
    image ``image_path`` when killed, when clearly theirs and dead: named as
    they named them (``.<name>.tmp-<random>`` staging, ``.image-<random>``
    extraction, ``.<name>.removing-<12 hex>`` disposal), holding only image
    files (staging, extraction), and untouched for LEGACY_GRACE seconds.
    Returns the names removed."""
    parent, base = os.path.split(image_path)
    staging, removing = '.%s.tmp-' % base, '.%s.removing-' % base
    removed = []
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return removed
    limit = time.time() - LEGACY_GRACE
    for name in names:
        if name.startswith(staging) and _MKTEMP_SUFFIX.match(name[len(staging):]):
            allowed = (DISK, MACHINE)
        elif name.startswith('.image-') and _MKTEMP_SUFFIX.match(name[len('.image-'):]):
            allowed = (DISK, LAYER, MACHINE)
        elif name.startswith(removing) and _REMOVING_SUFFIX.match(name[len(removing):]):
            allowed = None  # the image itself, half deleted: whatever it held was to go
        else:
            continue
        path = os.path.join(parent, name)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode) or _idle_since(path) > limit:
                continue
            if allowed is not None and not set(os.listdir(path)) <= set(allowed):
                continue  # not what those versions put there: not ours to delete
        except OSError:
            continue
        remove_tree(path)
        removed.append(name)
    return removed


# ---------------------------------------------------------------- the image

class MutableImage(object):
    """A mutable image folder: ``disk.img`` (raw) + ``machine.json``."""

    format = FORMAT

    def __init__(self, path, limits=DEFAULT_LIMITS, lock_timeout=3600):
        self.path = os.path.abspath(os.fspath(path))
        self.limits = limits
        self.lock_timeout = lock_timeout

    @property
    def disk(self):
        return os.path.join(self.path, DISK)

    @property
    def machine_path(self):
        return os.path.join(self.path, MACHINE)

    @property
    def layer(self):
        return os.path.join(self.path, LAYER)

    def exists(self):
        return os.path.lexists(self.path)

    @contextlib.contextmanager
    def _locked(self, missing_ok=False):
        """Hold the flock on the mutable image folder itself: one pack, create
        or dispose at a time per folder, no lock file inside it, gone when the
        holder dies.  With ``missing_ok`` a ``path`` that is not a folder is
        not locked (there is nothing to serialise; the plan then finds nothing
        or refuses)."""
        if missing_ok:
            try:
                folder = stat.S_ISDIR(os.lstat(self.path).st_mode)
            except FileNotFoundError:
                folder = False
            if not folder:
                yield
                return
        lock = FileLock(self.path, timeout=self.lock_timeout, poll=0.1, folder=True,
                        what='the lock of mutable image %s' % self.path)
        try:
            lock.acquire()
        except LockTimeoutError:
            raise
        except NotFoundError:
            if not missing_ok:
                raise NotFoundError('mutable image %s does not exist' % self.path)
            lock = None  # removed meanwhile: the plan sees it gone
        except VmImageError:
            raise VmImageError('%s is not a folder, so not a mutable image' % self.path)
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def _work_area(self):
        """Where this image is built and trashed: its parent folder, shared
        with the user, so only WORK_PREFIX names are ours."""
        return WorkArea(os.path.dirname(self.path), WORK_PREFIX)

    def collect(self, dest=None):
        """Remove what killed tasks left beside the image (and beside
        ``dest``): work folders whose lock died, trash, and the debris of
        earlier versions that is clearly dead (_collect_legacy_folders,
        _collect_stale_tmp).  Every real run of create, package and dispose
        calls it first.  Returns the names removed."""
        removed = []
        # Collecting never makes the task fail: what cannot be removed now
        # (an unreadable folder, a read-only file system) is tried again by
        # the next run, and the task itself reports its own errors.
        areas = [self._work_area()]
        if dest is not None:
            areas.append(WorkArea(os.path.dirname(dest), WORK_PREFIX))
        for area in areas:
            try:
                removed.extend(area.collect())
            except OSError:
                pass
        removed.extend(_collect_legacy_folders(self.path))
        if dest is not None:
            removed.extend(_collect_stale_tmp(dest))
        return removed

    # ------------------------------------------------------------ creation

    def plan_create(self, size_gib=None, machine=None, max_size_gib=DEFAULT_MAX_SIZE_GIB, archive=None,
                    use_qemu_img=True):
        """Decide how the missing ``path`` is created: blank (``size_gib``,
        ``machine``) or from ``archive``.  Every refusal is raised here, in
        check mode too; returns a CreatePlan for create()."""
        if archive is None:
            if size_gib is None:
                raise NotFoundError('%s does not exist; give size_gib (and machine) to create a blank image, or '
                                    'from_archive to create it from an archive' % self.path)
            size_gib = check_size_gib(size_gib, max_size_gib)
            machine = blank_machine(machine)
            machine_bytes = dump_machine_json(machine)
            self._check_new_path()
            return CreatePlan(self.path, 'blank', size_gib=size_gib, machine=machine, machine_bytes=machine_bytes)
        self._check_new_path()
        os.close(self._open_archive(archive))
        return CreatePlan(self.path, 'archive', archive=archive, use_qemu_img=use_qemu_img)

    def create(self, plan):
        """Apply a CreatePlan: build the image in a work folder beside
        ``path`` and rename it into place, so the folder appears complete or
        not at all; a killed create leaves a work folder the next run
        collects."""
        self.collect()
        if plan.source == 'blank':
            area = self._work_area()
            try:
                work = area.new('create')
            except OSError as exc:
                raise _error('create a folder in', area.path, exc)
            with work:
                self._write_new_file(work.path, DISK, size=plan.size_gib * GIB)
                self._write_new_file(work.path, MACHINE, data=plan.machine_bytes)
                self._commit(work)
        else:
            self._extract(plan)
        return self

    def _extract(self, plan):
        area = self._work_area()
        with os.fdopen(self._open_archive(plan.archive), 'rb') as src:
            try:
                work, _info, _result = load_image_archive(src, area, limits=self.limits,
                                                          use_qemu_img=plan.use_qemu_img, fsync=True)
            except OSError as exc:
                raise _error('extract archive %s into' % plan.archive, area.path, exc)
        with work:
            try:
                os.unlink(os.path.join(work.path, LAYER))
                for name in (DISK, MACHINE):
                    os.chmod(os.path.join(work.path, name), _file_mode())
            except OSError as exc:
                raise _error('create', self.path, exc)
            self._commit(work)

    @staticmethod
    def _open_archive(archive):
        """An fd of ``archive``, a regular file on this host."""
        try:
            # O_NONBLOCK: a FIFO given by mistake must fail, not hang.
            fd = os.open(archive, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            # A missing archive is not_found, as check mode always said.
            raise os_error(exc, 'read archive', archive,
                           NotFoundError if exc.errno == errno.ENOENT else VmImageError)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise VmImageError('archive %s is not a regular file' % archive)
        return fd

    @classmethod
    def create_blank(cls, path, size_gib, machine=None, max_size_gib=DEFAULT_MAX_SIZE_GIB,
                     limits=DEFAULT_LIMITS):
        """Create ``path`` with a sparse ``size_gib`` GiB disk.img and the
        validated ``machine``.  The folder appears complete or not at all."""
        image = cls(path, limits=limits)
        return image.create(image.plan_create(size_gib=size_gib, machine=machine, max_size_gib=max_size_gib))

    @classmethod
    def create_from_archive(cls, path, archive, limits=DEFAULT_LIMITS, use_qemu_img=True):
        """Create ``path`` from an image archive on this host.

        The archive is extracted and validated by the reader as untrusted
        input (into a work folder beside ``path``, removed on failure);
        layer.qcow2 is dropped, because the builder writes the raw disk and
        packing writes a fresh layer.  machine.json is kept byte for byte, so
        repacking an unmodified image gives the original archive back.
        """
        image = cls(path, limits=limits)
        return image.create(image.plan_create(archive=archive, use_qemu_img=use_qemu_img))

    def _check_new_path(self):
        if os.path.lexists(self.path):
            raise VmImageError('%s already exists' % self.path)
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise NotFoundError('parent folder %s of %s does not exist' % (parent, self.path))
        return parent

    @staticmethod
    def _write_new_file(folder, name, data=b'', size=None):
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if size is not None:
                    # Sparse: a blank disk costs no space until the VM writes it.
                    os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _error('write', path, exc)

    def _commit(self, work):
        """Rename a complete work folder to ``path``, durably."""
        try:
            # Work folders are private (0700) while they are built.
            os.chmod(work.path, _dir_mode())
            # rename() would replace an empty directory; commit refuses instead.
            work.commit(self.path)
        except OSError as exc:
            if os.path.lexists(self.path):
                raise VmImageError('%s already exists' % self.path)
            raise _error('create', self.path, exc)

    # ------------------------------------------------------------ inspection

    def inspect(self):
        """Read and check the folder; return a SourceState.

        disk.img must be a regular file whose size is a whole number of
        512-byte sectors (what a qcow2 layer can describe); machine.json must
        be valid (version 0 is migrated, as the reader does).
        """
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            raise NotFoundError('mutable image %s does not exist' % self.path)
        if not stat.S_ISDIR(st.st_mode):
            raise VmImageError('%s is not a folder, so not a mutable image' % self.path)
        try:
            disk_stat = os.lstat(self.disk)
        except FileNotFoundError:
            raise VmImageError('%s is not a mutable image: %s is missing' % (self.path, DISK))
        if not stat.S_ISREG(disk_stat.st_mode):
            raise VmImageError('%s is not a regular file' % self.disk)
        if disk_stat.st_size == 0 or disk_stat.st_size % SECTOR:
            raise VmImageError('%s is %d bytes; a disk must be a positive multiple of %d bytes'
                               % (self.disk, disk_stat.st_size, SECTOR))
        try:
            fd = os.open(self.machine_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VmImageError('%s is not a mutable image: %s is missing' % (self.path, MACHINE))
        except OSError as exc:
            raise _error('read', self.machine_path, exc)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise VmImageError('%s is not a regular file' % self.machine_path)
            data = os.read(fd, self.limits.max_machine_json + 1)
        finally:
            os.close(fd)
        machine = load_machine_json(data, max_size=self.limits.max_machine_json)
        return SourceState(disk_stat, data, machine)

    @property
    def machine(self):
        return self.inspect().machine

    def ensure_not_in_use(self, action):
        """ImageInUseError naming the processes (QEMU lock or open for
        writing) using disk.img, or layer.qcow2 if one is there."""
        paths = [self.disk]
        if os.path.lexists(self.layer):
            paths.append(self.layer)
        ensure_not_in_use(paths, '%s %s' % (action, self.path))

    # ------------------------------------------------------------ packing

    def fingerprint(self, source, level):
        """Everything the archive's bytes depend on, from stat calls and the
        small machine.json: no read of the disk."""
        zstd = zstd_module()
        return {
            'pack_format': PACK_FORMAT,
            'level': level,
            'disk': source.disk_identity(),
            'machine_sha256': hashlib.sha256(source.machine_bytes).hexdigest(),
            'qemu_img': _tool_identity(find_qemu_img()),
            'zstd': [getattr(zstd, '__version__', '?'), list(getattr(zstd, 'ZSTD_VERSION', ()))],
        }

    def _check_dest(self, dest):
        dest = os.path.abspath(os.fspath(dest))
        dest_dir = os.path.dirname(dest)
        if dest == self.path or dest.startswith(self.path + os.sep):
            raise VmImageError('dest %s must be outside the mutable image folder %s' % (dest, self.path))
        if not os.path.isdir(dest_dir):
            raise NotFoundError('destination folder %s does not exist' % dest_dir)
        if os.path.isdir(dest):
            raise VmImageError('dest %s is a folder; give the archive file name' % dest)
        return dest

    def plan_package(self, dest, level=DEFAULT_LEVEL, force=False, creation=None):
        """Decide what package() would do, without writing or locking;
        returns a PackPlan (``.result()`` is the predicted PackageResult).
        ``creation``: the CreatePlan of this (still missing) image, whose pack
        is then pending because the image would be created."""
        level = check_level(level)
        dest = self._check_dest(dest)
        if creation is not None:
            return PackPlan(dest, level, force, 'pack', reason='path would be created',
                            virtual_size=creation.disk_size)
        return self._decide_pack(dest, level, force)

    def _decide_pack(self, dest, level, force):
        snapshot_ns = time.time_ns()
        source = self.inspect()
        self.ensure_not_in_use('pack')
        fingerprint = self.fingerprint(source, level)
        sidecar = _read_sidecar(dest)
        dest_known = _dest_matches(sidecar, dest)
        if dest_known and sidecar.get('source') == fingerprint:
            action = 'verify' if force or sidecar.get('racy') else 'keep'
        else:
            action = 'pack'
        reason = None if action == 'keep' else self._reason(dest, sidecar, dest_known, fingerprint, force)
        return PackPlan(dest, level, force, action, reason=reason, source=source, fingerprint=fingerprint,
                        sidecar=sidecar if dest_known else None, snapshot_ns=snapshot_ns,
                        virtual_size=source.disk_size)

    def package(self, dest, level=DEFAULT_LEVEL, threads=0, force=False, check_mode=False):
        """Write the image archive of this folder to ``dest``.

        Returns a PackageResult.  Nothing is compressed when the sidecar shows
        ``dest`` already holds what packing would produce (unless ``force``).
        Refused (ImageInUseError) while a process uses the disk.  On failure
        neither a temporary nor a partial archive is left, and ``dest`` and
        its sidecar are as before.  Check mode returns the plan's prediction;
        a real run makes the plan under the folder lock and applies it.
        """
        level = check_level(level)
        dest = self._check_dest(dest)
        if check_mode:
            return self._decide_pack(dest, level, force).result()
        self.collect(dest)
        with self._locked():
            plan = self._decide_pack(dest, level, force)
            if plan.action == 'keep':
                return plan.result()
            return self._pack(plan, threads)

    @staticmethod
    def _reason(dest, sidecar, dest_known, fingerprint, force):
        if force:
            return 'force'
        if not os.path.lexists(dest):
            return 'dest does not exist'
        if not dest_known:
            return 'dest was not written by a pack recorded in %s' % os.path.basename(sidecar_path(dest))
        if sidecar.get('racy'):
            return 'disk.img was written too close to the last pack to trust its timestamps'
        old = sidecar.get('source') or {}
        changed = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
        return 'changed since the last pack: %s' % ', '.join(changed)

    def _prepare_layer(self, disk_size, force):
        """Put the canonical empty overlay at layer.qcow2.

        A layer.qcow2 already in the folder that differs from it may hold
        writes of a VM that ran on the overlay instead of the raw disk:
        replacing it would lose them, so that is refused unless ``force``.
        """
        fresh = os.path.join(self.path, '.pack-layer-%s.qcow2' % os.urandom(8).hex())
        try:
            create_overlay(fresh, DISK, 'raw', fmt='qcow2', extra_options=dict(LAYER_OPTIONS),
                           limits=self.limits, size=disk_size)
            if os.path.lexists(self.layer) and not force:
                if not os.path.isfile(self.layer) or os.path.islink(self.layer) \
                        or not _same_bytes(self.layer, fresh):
                    raise VmImageError(
                        '%s is not the empty overlay packing writes: it may hold changes a VM wrote to the '
                        'overlay instead of disk.img. Merge them (qemu-img commit -f qcow2 %s) or remove it, '
                        'or use force to replace it' % (self.layer, self.layer))
            os.replace(fresh, self.layer)
        except OSError as exc:
            raise _error('write', self.layer, exc)
        finally:
            _remove_quietly(fresh)

    def _clean_own_temporaries(self):
        """Under the folder lock no pack runs, so any temporary of ours left
        in the folder belongs to a pack that died."""
        for name in os.listdir(self.path):
            if name.startswith(_OWN_TEMP_PREFIXES):
                _remove_quietly(os.path.join(self.path, name))

    def _pack(self, plan, threads):
        """Apply a 'pack' or 'verify' PackPlan: write the archive in a work
        folder beside dest, then the sidecar, then rename the archive onto
        dest (unless it has dest's bytes already)."""
        dest, source = plan.dest, plan.source
        dest_dir = os.path.dirname(dest)
        self._clean_own_temporaries()
        try:
            work = WorkArea(dest_dir, WORK_PREFIX).new('pack')
        except OSError as exc:
            raise _error('write an archive in', dest_dir, exc)
        with work:
            try:
                fd = os.open(os.path.join(work.path, WORK_ARCHIVE),
                             os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise _error('write an archive in', dest_dir, exc)
            try:
                self._prepare_layer(source.disk_size, plan.force)
                try:
                    out = os.fdopen(fd, 'wb', buffering=_READ_CHUNK, closefd=False)
                    with out:
                        packed = write_image_archive(self.path, out, level=plan.level, threads=threads, mtime=0,
                                                     write_behind=True)
                        out.flush()
                    os.fsync(fd)
                except OSError as exc:
                    raise _error('write archive', dest, exc)
                finally:
                    # Derived and canonical: the folder is left as it was found.
                    _remove_quietly(self.layer)
                self._check_unchanged(source)
                os.fchmod(fd, _file_mode())
                tmp_stat = os.fstat(fd)
            finally:
                os.close(fd)
            previous = plan.previous_digest
            if previous is None and os.path.isfile(dest) and os.path.getsize(dest) == tmp_stat.st_size:
                previous = _sha256_file(dest)
            sidecar = {
                'format': SIDECAR_FORMAT,
                'source': plan.fingerprint,
                'racy': _is_racy(source.disk_stat, plan.snapshot_ns),
                'data_bytes': packed.data_bytes,
                'disk_size': packed.disk_size,
                'level': plan.level,
                'packed_at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
            }
            if previous == packed.digest:
                # Same bytes: keep dest as it is (its mtime too), only record
                # what it was made from.
                sidecar['archive'] = {'digest': packed.digest, 'identity': _file_identity(os.stat(dest))}
                self._write_sidecar(work, dest, sidecar)
                changed = False
            else:
                # The sidecar describes the work file, which becomes dest by
                # rename (same inode and mtime).  Written first, a crash
                # before the rename leaves a sidecar matching nothing, never
                # one vouching for the old archive.
                sidecar['archive'] = {'digest': packed.digest, 'identity': _file_identity(tmp_stat)}
                self._write_sidecar(work, dest, sidecar)
                try:
                    work.commit_file(WORK_ARCHIVE, dest)
                except OSError as exc:
                    raise _error('rename the archive to', dest, exc)
                changed = True
        return PackageResult(changed, True, dest, digest=packed.digest, archive_size=packed.archive_size,
                             virtual_size=packed.disk_size, data_bytes=packed.data_bytes,
                             previous_digest=previous, reason=plan.reason)

    @staticmethod
    def _write_sidecar(work, dest, sidecar):
        """write_json_atomic in the work folder (so its temporary is the work
        folder's too, never a stray file in the user's folder), then one
        rename onto <dest>.vmimage.json."""
        target = sidecar_path(dest)
        staged = os.path.join(work.path, WORK_SIDECAR)
        try:
            write_json_atomic(staged, sidecar, _file_mode())
            os.rename(staged, target)
            fsync_dir(os.path.dirname(target))
        except OSError as exc:
            raise _error('write', target, exc)

    def _check_unchanged(self, before):
        """The disk or machine.json changed while packing: the archive may mix
        old and new content, so it is thrown away."""
        after = self.inspect()
        if after.disk_identity() != before.disk_identity():
            raise VmImageError('%s changed while it was being packed (is a VM or another program writing '
                               'it?); nothing was written' % self.disk)
        if after.machine_bytes != before.machine_bytes:
            raise VmImageError('%s changed while the image was being packed; nothing was written'
                               % self.machine_path)

    # ------------------------------------------------------------ disposal

    def unknown_files(self):
        """Files in the folder that are not part of a mutable image."""
        return sorted(n for n in os.listdir(self.path)
                      if n not in (DISK, MACHINE, LAYER) and not n.startswith(_OWN_TEMP_PREFIXES))

    def plan_dispose(self, force=False):
        """Decide whether dispose() removes the folder; every refusal is
        raised here: while the disk is in use, for a folder that does not
        look like a mutable image (no disk.img), or holds other files unless
        ``force`` (a wrong ``path`` must not delete someone's data)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return DisposePlan(self.path, False)
        if not stat.S_ISDIR(st.st_mode):
            raise VmImageError('%s is not a folder, so not a mutable image; not removing it' % self.path)
        if not os.path.isfile(self.disk) or os.path.islink(self.disk):
            raise VmImageError('%s has no %s, so it is not a mutable image; not removing it'
                               % (self.path, DISK))
        unknown = self.unknown_files()
        if unknown and not force:
            raise VmImageError('%s holds files that are not part of a mutable image (%s); not removing it '
                               'without force' % (self.path, ', '.join(unknown[:10])))
        self.ensure_not_in_use('remove')
        return DisposePlan(self.path, True)

    def remove(self, force=False, check_mode=False):
        """Remove the folder; return the DisposePlan it applied (check mode:
        the plan).  The folder is renamed into the work area first, so it
        vanishes at once even if deleting a large sparse disk takes a while
        or is interrupted; a killed removal leaves trash the next run
        collects."""
        if check_mode:
            return self.plan_dispose(force)
        self.collect()
        with self._locked(missing_ok=True):
            plan = self.plan_dispose(force)
            if plan.remove:
                try:
                    self._work_area().trash(self.path)
                except OSError as exc:
                    raise _error('remove', self.path, exc)
        return plan

    def dispose(self, force=False, check_mode=False):
        """Remove the folder; return True if it existed (see remove())."""
        return self.remove(force=force, check_mode=check_mode).remove
