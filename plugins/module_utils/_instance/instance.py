# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Copy-on-write VM instances of cached images.

An instance is a folder ``<store>/instances/<name>/`` holding

* ``disk.qcow2``: a qcow2 overlay whose backing file is the image's
  ``layer.qcow2`` (absolute path, backing format qcow2), itself backed by
  ``disk.img`` (format raw).  Every step names its format, so nothing is
  ever probed.  Creating it costs one ``qemu-img create``, whatever the
  image's size, and the cached files are opened read-only by every VM: one
  image serves any number of instances.
* ``instance.json``: {name, digest, image_id, mac, uuid, machine, overrides,
  ...}.  The instance's reference to its image is a reference record of the
  store (``refs/<image>/instance-…``), written under the store lock before
  the instance appears and removed after it is gone, so an image with
  instances can be neither removed nor collected.

Creation happens in a WorkFolder of ``instances/`` (prefix ``.work-``, so it
is never taken for an instance) and is committed by one rename under the
store lock, after checking, under that same lock, that the image still
exists.  Removal is one rename into that work area (the instance is gone at
once), then the reference goes, then the files.  A killed process leaves
only work folders whose lock is free, which the next run collects: either
no instance, or a complete instance with its reference.

Operations on one instance name are serialised by a per-name lock in
``<store>/locks/``; the lock order is name lock, then store lock.

Operating-system errors (a full file system, a read-only store, a folder the
user may not enter) come out as NoSpaceError / PermissionDeniedError /
StoreError naming the instance and the path, after the work folder is gone.
A refusal because a process holds the disk (ImageInUseError) carries those
processes in ``holders``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import os
import re

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    ImageInUseError, InvalidMachineError, NoSpaceError, NotFoundError, PermissionDeniedError, StoreError,
    VmImageError, os_error, os_errors,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.machine import (
    apply_defaults, is_valid_mac, is_valid_uuid, merge_machine, random_mac, random_uuid, validate_machine,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.command_line import build_qemu_args, machine_accelerator
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.qemu_img import create_overlay, qemu_img_info
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.image_locks import describe_holders, usage_reports
from ansible_collections.vmimage.qemu.plugins.module_utils._core.fs import read_json, write_json_atomic
from ansible_collections.vmimage.qemu.plugins.module_utils._core.layout import DISK, INSTANCE_RECORD, LAYER, now
from ansible_collections.vmimage.qemu.plugins.module_utils._core.staging import WorkArea

INSTANCE_NAME_PATTERN = r'[A-Za-z0-9][A-Za-z0-9_.-]{0,63}'
INSTANCE_DISK = 'disk.qcow2'
INSTANCE_FORMAT = 'qcow2'
RECORD_VERSION = 1

_NAME_RE = re.compile(INSTANCE_NAME_PATTERN)
_WORK_PREFIX = '.work-'
# Random MACs are redrawn when they collide; 48 bits make a second draw
# already rare, so running out means the random source is broken.
_MAC_ATTEMPTS = 64


def check_instance_name(name):
    """Return ``name`` if it is a valid instance name, else raise StoreError.

    Names start with a letter or digit, so they can never collide with the
    store's own ``.new-``/``.old-`` work folders, nor be ``.`` or ``..``.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise StoreError('invalid instance name %r: it must match %s' % (name, INSTANCE_NAME_PATTERN))
    return name


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InstanceChange(object):
    """What ensure_present/remove did (or would do, in check mode).

    action: 'none', 'create', 'update' (record only), 'replace' (new disk
    from another image) or 'remove'.  before/after: the record before and
    after (None when absent; in check mode ``after`` is a prediction whose
    random fields are None).  owners: processes holding the disk.
    """

    __slots__ = ('action', 'before', 'after', 'owners', 'cleaned')

    def __init__(self, action, before, after, owners=None, cleaned=None):
        self.action = action
        self.before = before
        self.after = after
        self.owners = owners or []
        self.cleaned = cleaned or []

    @property
    def changed(self):
        return self.action != 'none'


class InstancePlan(object):
    """A decision of plan_present/plan_remove: ``action`` and the records
    ``before`` and ``after`` (random fields of a new instance None), the
    ``owners`` of the disk, and the image record it was decided against.
    Check mode returns ``change()``; a real run applies exactly this plan."""

    __slots__ = ('action', 'before', 'after', 'owners', 'image_record')

    def __init__(self, action, before, after, owners, image_record=None):
        self.action = action
        self.before = before
        self.after = after
        self.owners = owners
        self.image_record = image_record

    def change(self, cleaned=None):
        return InstanceChange(self.action, self.before, self.after, self.owners, cleaned=cleaned)


class InstanceManager(object):
    """Instances of one ImageStore."""

    def __init__(self, store):
        self.store = store
        self.work = WorkArea(store.instances_dir, prefix=_WORK_PREFIX)

    # ------------------------------------------------------------ paths & records

    def instance_path(self, name):
        return os.path.join(self.store.instances_dir, check_instance_name(name))

    def disk_path(self, name):
        return os.path.join(self.instance_path(name), INSTANCE_DISK)

    def get(self, name):
        """The record of instance ``name``, or None."""
        record = read_json(os.path.join(self.instance_path(name), INSTANCE_RECORD))
        if record is not None and (not isinstance(record, dict) or record.get('name') != name):
            raise StoreError('instance record of %s is damaged (name %r)'
                             % (name, record.get('name') if isinstance(record, dict) else record))
        return record

    def list(self):
        """Records of every committed instance, by name (one pass over instances/)."""
        try:
            names = sorted(os.listdir(self.store.instances_dir))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return []
            raise os_error(exc, 'list the instances in', self.store.instances_dir, StoreError)
        records = []
        for name in names:
            if not _NAME_RE.fullmatch(name):
                continue  # work folders (.work-*) and anything that is not an instance
            record = read_json(os.path.join(self.store.instances_dir, name, INSTANCE_RECORD))
            if isinstance(record, dict) and record.get('name') == name:
                records.append(record)
        return records

    def _name_lock(self, name):
        return self.store.key_lock('instance:' + name)

    # ------------------------------------------------------------ owners & reports

    def owners(self, name):
        """Processes holding the instance's disk, as image_locks.disk_holders
        reports them ({pid, command, fd, writable, locks}): those holding
        QEMU's image lock on it or having it open for writing.  A lock held by
        a process this user cannot inspect gives one entry with pid and
        command None, so a running VM is never taken for a stopped one.
        """
        return self.owners_of_all([name])[name]

    def owners_of_all(self, names):
        """{name: owners} for many instances, with one pass over /proc."""
        disks = dict((name, self.disk_path(name)) for name in names)
        with os_errors('check which processes use the disks in', self.store.instances_dir, StoreError):
            reports = usage_reports(list(disks.values()))
        owners = {}
        for name, disk in disks.items():
            in_use, holders, _locks = reports[disk]
            if in_use and not holders:
                holders = [{'pid': None, 'command': None, 'fd': None, 'writable': None, 'locks': []}]
            owners[name] = holders
        return owners

    def expected_chain(self, name, digest):
        """The backing chain an instance of ``digest`` has by construction."""
        image = self.store.image_path(digest)
        return [
            {'filename': self.disk_path(name), 'format': INSTANCE_FORMAT},
            {'filename': os.path.join(image, LAYER), 'format': 'qcow2'},
            {'filename': os.path.join(image, DISK), 'format': 'raw'},
        ]

    def backing_chain(self, name):
        """The backing chain as qemu-img reports it: [{'filename', 'format'}].

        Opened with -U (force share), so this works while a VM runs.
        """
        chain = qemu_img_info(self.disk_path(name), INSTANCE_FORMAT, limits=self.store.limits,
                              backing_chain=True)
        return [{'filename': entry.get('filename'), 'format': entry.get('format')} for entry in chain]

    @staticmethod
    def accelerator(record, accel='auto', binary=None):
        """The AccelDecision for the instance of ``record`` ('auto' tries KVM
        with its machine type and CPU model; see accelerator.py)."""
        kw = dict(binary=binary) if binary else {}
        return machine_accelerator(record['machine'], accel, **kw)

    def qemu_args(self, record, accel='auto', netdev='user', display='none', binary=None):
        """The QEMU argv that boots the instance of ``record``; ``accel`` as
        for build_qemu_args() (a string, or a decision from accelerator())."""
        kw = {}
        if binary:
            kw['binary'] = binary
        return build_qemu_args(record['machine'], self.disk_path(record['name']), INSTANCE_FORMAT,
                               mac=record['mac'], name=record['name'], accel=accel, netdev=netdev,
                               display=display, **kw)

    # ------------------------------------------------------------ work folders

    def cleanup(self):
        """Remove work folders whose creator died; return their names."""
        if not os.path.isdir(self.store.instances_dir):
            return []
        return self.work.collect()

    # ------------------------------------------------------------ desired state

    def _image(self, image):
        """(digest, image record) for an alias or digest reference."""
        digest = self.store.resolve(image)
        record = self.store.get_record(digest)
        if record is None:
            raise NotFoundError('no image %s in store %s' % (image, self.store.root))
        return digest, record

    def _used_macs(self, exclude=None):
        return dict((r.get('mac'), r.get('name')) for r in self.list() if r.get('name') != exclude)

    def _check_mac_free(self, name, mac):
        """Called under the store lock before a record is committed: the
        earlier check ran unlocked, and two runs may have picked one MAC."""
        owner = self._used_macs(exclude=name).get(mac)
        if owner is not None:
            raise InvalidMachineError('mac', '%s is already the MAC of instance %s' % (mac, owner))

    def _desired(self, name, digest, image_record, image_id, mac, overrides, current):
        """The record the instance should have; mac/uuid None = still to be drawn."""
        if overrides is None:
            overrides = (current.get('overrides') or {}) if current else {}
        if not isinstance(overrides, dict):
            raise InvalidMachineError('(overrides)', 'must be an object')
        overrides = dict(overrides)
        # mac and uuid are the instance's identity: they come from the
        # overrides, else the existing instance, else a random draw.
        rest = dict((k, v) for k, v in overrides.items() if k not in ('mac', 'uuid'))
        override_mac = overrides.get('mac')
        if mac is not None and override_mac is not None and mac != override_mac:
            raise InvalidMachineError('mac', 'the mac option (%s) and machine.mac (%s) differ' % (mac, override_mac))
        if mac is None:
            mac = override_mac
        base = validate_machine(image_record.get('machine') or {'version': 1})
        if mac is not None:
            if not is_valid_mac(mac):
                raise InvalidMachineError('mac', 'must be a lowercase, locally administered, unicast MAC address '
                                                 '(got %r)' % (mac,))
            if mac == base.get('mac'):
                raise InvalidMachineError('mac', "%s is the image's default MAC; every instance needs its own" % mac)
            self._check_mac_free(name, mac)
        elif current is not None and current.get('mac') != base.get('mac'):
            # Kept for the instance's life; only a replacement image whose
            # default is this very MAC makes it draw a new one.
            mac = current.get('mac')
        uuid = overrides.get('uuid')
        if uuid is not None and not is_valid_uuid(uuid):
            raise InvalidMachineError('uuid', 'must be a lowercase RFC 4122 UUID with version 1-5 (got %r)' % (uuid,))
        if uuid is None and current is not None:
            uuid = current.get('uuid')

        machine = merge_machine(base, rest)
        machine.pop('mac', None)
        machine.pop('uuid', None)
        if mac is not None:
            machine['mac'] = mac
        if uuid is not None:
            machine['uuid'] = uuid
        keep_image_id = current is not None and current.get('digest') == digest
        return {
            'version': RECORD_VERSION,
            'name': name,
            'digest': digest,
            'image_id': current.get('image_id') if keep_image_id else image_id,
            'mac': mac,
            'uuid': uuid,
            'machine': apply_defaults(machine),
            'overrides': overrides,
            'format': INSTANCE_FORMAT,
            'disk': INSTANCE_DISK,
        }

    def _draw_identity(self, desired, image_record):
        """Fill in a random MAC (never the image's, never another instance's)
        and a random uuid where the desired record has none."""
        if desired['mac'] is None:
            taken = set(self._used_macs(exclude=desired['name']))
            image_mac = (image_record.get('machine') or {}).get('mac')
            if image_mac:
                taken.add(image_mac)
            for _attempt in range(_MAC_ATTEMPTS):
                mac = random_mac()
                if mac not in taken:
                    break
            else:
                raise StoreError('could not draw an unused random MAC address')
            desired['mac'] = mac
            desired['machine']['mac'] = mac
        if desired['uuid'] is None:
            desired['uuid'] = random_uuid()
            desired['machine']['uuid'] = desired['uuid']
        desired['machine'] = validate_machine(desired['machine'])
        return desired

    @staticmethod
    def _same(current, desired):
        return all(current.get(k) == desired.get(k) for k in ('digest', 'mac', 'uuid', 'machine', 'overrides'))

    # ------------------------------------------------------------ present

    def ensure_present(self, name, image, mac=None, machine=None, recreate=False, force=False,
                       check_mode=False):
        """Make instance ``name`` exist as a copy-on-write instance of ``image``.

        ``mac``: the NIC address (default: the instance's current one, else
        a random local unicast address that is neither the image's default
        nor another instance's).  ``machine``: overrides merged over the
        image's machine.json (None: keep the instance's current overrides;
        a value of None removes a field); ``uuid``/``mac`` in it set the
        instance's identity.  An instance built from another image is an
        error unless ``recreate`` (its mac and uuid are kept); replacing a
        disk a VM holds also needs ``force``.  Returns an InstanceChange.
        """
        check_instance_name(name)
        with os_errors('create or update instance %s in store' % name, self.store.root, StoreError):
            return self._ensure_present(name, image, mac, machine, recreate, force, check_mode)

    def plan_present(self, name, image, mac=None, machine=None, recreate=False, force=False):
        """What ensure_present would do, decided once (reads only): an
        InstancePlan.  The random fields of a new instance stay None."""
        digest, image_record = self._image(image)
        current = self.get(name)
        self._check_same_image(name, current, image, digest, recreate)
        desired = self._desired(name, digest, image_record, image, mac, machine, current)
        if current is None:
            return InstancePlan('create', current, desired, [], image_record)
        if current.get('digest') != digest:
            owners = self._refuse_if_held(name, force, 'replace')
            return InstancePlan('replace', current, desired, owners, image_record)
        owners = self.owners(name)
        if self._same(current, desired):
            return InstancePlan('none', current, current, owners, image_record)
        after = dict(current)
        after.update((k, desired[k]) for k in ('mac', 'uuid', 'machine', 'overrides'))
        return InstancePlan('update', current, after, owners, image_record)

    def _ensure_present(self, name, image, mac, machine, recreate, force, check_mode):
        if check_mode:
            return self.plan_present(name, image, mac, machine, recreate, force).change()
        self._image(image)  # a missing image fails before anything is locked or collected
        cleaned = self.cleanup()
        with self._name_lock(name):
            # Decided under the name lock, then applied as decided.
            plan = self.plan_present(name, image, mac, machine, recreate, force)
            if plan.action not in ('create', 'replace'):
                return self._apply_present(name, plan, cleaned)
            # Until the instance's own reference exists, a lease keeps the
            # image from being collected under it.
            with self.store.lease(plan.after['digest']):
                return self._apply_present(name, plan, cleaned)

    def _apply_present(self, name, plan, cleaned):
        if plan.action == 'none':
            return plan.change(cleaned)
        after = self._draw_identity(dict(plan.after), plan.image_record)
        if plan.action in ('create', 'replace'):
            after = self._create(name, after, replace=plan.before)
        else:
            after['updated_at'] = now()
            with self.store.lock():
                self._check_mac_free(name, after['mac'])
                write_json_atomic(os.path.join(self.instance_path(name), INSTANCE_RECORD), after)
        return InstanceChange(plan.action, plan.before, after, plan.owners, cleaned=cleaned)

    @staticmethod
    def _check_same_image(name, current, image, digest, recreate):
        if current is not None and current.get('digest') != digest and not recreate:
            raise StoreError('instance %s was created from image %s (%s), not %s (%s); set recreate to replace it'
                             % (name, current.get('image_id'), current.get('digest'), image, digest))

    def _refuse_if_held(self, name, force, what):
        owners = self.owners(name)
        if owners and not force:
            visible = [o for o in owners if o.get('pid') is not None]
            who = describe_holders(visible) if visible else 'a process this user cannot inspect'
            error = ImageInUseError('cannot %s instance %s: its disk %s is in use by %s; stop the VM or set force'
                                    % (what, name, self.disk_path(name), who))
            # As RV(owners) reports them: a lock held by a process this user
            # cannot inspect is one entry whose pid and command are None.
            error.holders = owners
            raise error
        return owners

    def _create(self, name, desired, replace):
        """Build the instance in a work folder, then commit it (see module doc)."""
        layer = os.path.join(self.store.image_path(desired['digest']), LAYER)
        work = self.work.new(name)
        try:
            disk = os.path.join(work.path, INSTANCE_DISK)
            try:
                create_overlay(disk, layer, 'qcow2', fmt=INSTANCE_FORMAT, limits=self.store.limits)
            except (NoSpaceError, PermissionDeniedError) as exc:
                raise type(exc)('cannot create the disk of instance %s in %s: %s'
                                % (name, self.store.instances_dir, exc))
            # Guest data: private to the VM's owner.
            os.chmod(disk, 0o600)
            _fsync_file(disk)
            record = dict(desired)
            record['backing'] = layer
            record['created_at'] = now()
            write_json_atomic(os.path.join(work.path, INSTANCE_RECORD), record)
            self._commit(name, work, record, replace)
            return record
        finally:
            work.discard()

    def _commit(self, name, work, record, replace):
        """The reference is taken here, under the store lock, after checking
        under that lock that the image is still there; then one rename."""
        final = self.instance_path(name)
        refs = self.store.refs
        with self.store.lock():
            if self.store.get_record(record['digest']) is None:
                raise NotFoundError('image %s was removed while instance %s was being created'
                                    % (record['digest'], name))
            self._check_mac_free(name, record['mac'])
            if replace is None and os.path.lexists(final):
                raise StoreError('%s exists but holds no instance record; remove it by hand' % final)
            refs.add(record['digest'], 'instance', name)
            old = None
            try:
                if replace is not None:
                    # The old instance moves aside (still whole, owned by our
                    # lock) until the new one is in place.
                    old = self.work.new(name + '-old')
                    os.rename(final, os.path.join(old.path, name))
                try:
                    work.commit(final)
                except BaseException:
                    if old is not None:
                        os.rename(os.path.join(old.path, name), final)
                    raise
            except BaseException:
                if replace is None or replace.get('digest') != record['digest']:
                    refs.remove(record['digest'], 'instance', name)
                if old is not None:
                    old.discard()
                raise
            if replace is not None and replace.get('digest') != record['digest']:
                refs.remove(replace['digest'], 'instance', name)
        if old is not None:
            old.discard()
            try:
                self.store.touch(record['digest'])
            except (OSError, VmImageError):
                pass  # last use is bookkeeping; the instance is committed

    # ------------------------------------------------------------ absent

    def remove(self, name, force=False, check_mode=False):
        """Remove instance ``name`` (releasing its reference to the image).

        Refused (ImageInUseError naming the processes) while a process holds
        the disk, unless ``force``.  Returns an InstanceChange.
        """
        check_instance_name(name)
        with os_errors('remove instance %s from store' % name, self.store.root, StoreError):
            return self._remove(name, force, check_mode)

    def plan_remove(self, name, force=False):
        """What remove would do (reads only): an InstancePlan."""
        current = self.get(name)
        if current is None:
            return InstancePlan('none', None, None, [])
        return InstancePlan('remove', current, None, self._refuse_if_held(name, force, 'remove'))

    def _remove(self, name, force, check_mode):
        if check_mode:
            return self.plan_remove(name, force).change()
        if self.get(name) is None:
            self.cleanup()
            return InstancePlan('none', None, None, []).change()
        cleaned = self.cleanup()
        with self._name_lock(name):
            plan = self.plan_remove(name, force)
            if plan.action == 'remove':
                with self.store.lock():
                    self.work.trash(self.instance_path(name))
                    if isinstance(plan.before.get('digest'), str):
                        self.store.refs.remove(plan.before['digest'], 'instance', name)
            return plan.change(cleaned)
