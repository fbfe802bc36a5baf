#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: vm_image_package
short_description: Build QEMU images in a mutable folder and pack them into deterministic image archives
version_added: 0.1.0
description:
  - Manages a I(mutable image), a folder on the target holding a raw, sparse C(disk.img) that an image builder
    boots and writes directly, and a validated C(machine.json).
  - Creates it blank (O(size_gib) and O(machine)) or from an existing C(image.tar.zst) (O(from_archive)) when
    O(path) does not exist.
  - With O(dest), packs it into an C(image.tar.zst) the other modules of the collection (and GNU tar with the
    zstd CLI) read. The archive is written in a work folder C(.vmimage-work-pack-*) beside O(dest) and renamed
    onto O(dest) only when it is complete; a failure leaves neither a partial archive nor temporary files.
  - New images are built in a work folder beside O(path) and appear by one rename; O(state=absent) renames the
    folder into a work folder before deleting it. A task killed at any point (even with C(SIGKILL)) leaves
    only C(.vmimage-work-*) names, which the next run beside them (in O(path)'s or O(dest)'s folder) removes.
    Nothing else in those folders is touched.
  - Packing is deterministic, so the same folder always gives the same bytes. A sidecar file
    C(<dest>.vmimage.json) records what the archive was made from; when nothing changed since, the module
    reports no change after a few C(stat) calls, without reading the disk or compressing anything.
  - Packing and removing are refused while a process uses the disk, as a running QEMU announces with its
    image lock (or any process with the disk open for writing); the error names the processes.
author:
  - vmimage.qemu developers (@vmimage)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details:
      - When the sidecar cannot vouch for O(dest), check mode predicts a change; a real run packs and reports
        no change if the bytes come out the same.
  diff_mode:
    support: full
  platform:
    platforms: posix
    details:
      - Linux only (QEMU's OFD image locks and C(/proc) are used to find a running VM).
options:
  path:
    description:
      - Folder of the mutable image. It holds C(disk.img) and C(machine.json);
        C(layer.qcow2) only exists while a pack runs.
    type: path
    required: true
  state:
    description:
      - V(present) creates O(path) if it is missing and packs it when O(dest) is given.
      - V(absent) removes O(path). Refused while a VM uses the disk, when O(path) does not look like a mutable
        image (no C(disk.img)), and when it holds other files, unless O(force=true).
    type: str
    choices: [present, absent]
    default: present
  size_gib:
    description:
      - Size of the disk of a new blank image, in GiB. The disk is sparse, so it costs no space until written.
      - Only used when O(path) does not exist. Mutually exclusive with O(from_archive).
    type: int
  machine:
    description:
      - Machine definition (C(machine.json) schema version 1) of a new blank image. C(version) may be left out.
        Missing fields get the collection's defaults; C(uuid) and C(mac) are only set when given here, so that
        every VM made from the image can get its own.
      - Only used when O(path) does not exist, together with O(size_gib).
    type: dict
  max_size_gib:
    description:
      - Largest O(size_gib) accepted (the original system's limit).
      - Note that M(vmimage.qemu.vm_image_fetch) refuses disks over 50 GiB by default.
    type: int
    default: 80
  from_archive:
    description:
      - Path on the target of an C(image.tar.zst) to create O(path) from when it does not exist.
      - The archive is extracted and validated as untrusted input, exactly as M(vmimage.qemu.vm_image_fetch)
        validates downloads; its C(layer.qcow2) is dropped, since the builder writes the raw disk.
        C(machine.json) is kept byte for byte, so packing an unmodified image gives the same archive back.
    type: path
  validate_with_qemu_img:
    description:
      - With O(from_archive), also cross-check the extracted image with C(qemu-img info) (resource limited).
    type: bool
    default: true
  dest:
    description:
      - Where to write the image archive of O(path). Its folder must exist; it must be outside O(path).
      - A sidecar C(<dest>.vmimage.json) is written beside it.
    type: path
  compression_level:
    description:
      - zstd compression level.
    type: int
    default: 3
  threads:
    description:
      - zstd worker threads; V(0) uses every core. The archive's bytes do not depend on it.
    type: int
    default: 0
  force:
    description:
      - Pack even when the sidecar shows O(dest) is up to date (the result is still compared with O(dest), and
        the task only reports a change when the bytes differ).
      - Replace a C(layer.qcow2) found in O(path) that is not the empty overlay packing writes.
      - With O(state=absent), remove O(path) even if it holds files other than those of a mutable image.
      - Never overrides the refusal to pack or remove an image a running VM uses.
    type: bool
    default: false
requirements:
  - Python 3.9 or newer on the target
  - zstandard (Python library)
  - qemu-img (package qemu-utils)
notes:
  - The VM that builds the image must use C(disk.img) as a C(raw) drive, for example
    C(-drive file=/path/disk.img,format=raw,if=virtio).
  - Archives over 50 GiB of disk are refused by the collection's readers with their default limits.
seealso:
  - module: vmimage.qemu.vm_image_fetch
  - module: vmimage.qemu.vm_image_info
'''

EXAMPLES = r'''
- name: Start a blank 20 GiB image to install an OS on
  vmimage.qemu.vm_image_package:
    path: /srv/build/win11
    size_gib: 20
    machine:
      memory: 4096
      cores: 2
      network: e1000

- name: Start from the current release, to update it
  vmimage.qemu.vm_image_package:
    path: /srv/build/builder
    from_archive: /srv/releases/builder-2026-10.tar.zst

# ... boot QEMU on /srv/build/builder/disk.img (format=raw), provision, shut it down ...

- name: Pack it (no change, and no work, when the disk has not changed since the last pack)
  vmimage.qemu.vm_image_package:
    path: /srv/build/builder
    dest: /srv/releases/builder-2026-11.tar.zst
    compression_level: 9
  register: packed

- name: Publish the digest for vm_image_fetch's checksum option
  ansible.builtin.copy:
    content: "{{ packed.digest | replace('sha256:', '') }}  builder-2026-11.tar.zst\n"
    dest: /srv/releases/builder-2026-11.tar.zst.sha256

- name: Throw the build folder away
  vmimage.qemu.vm_image_package:
    path: /srv/build/builder
    state: absent
'''

RETURN = r'''
path:
  description: Absolute path of the mutable image folder.
  returned: always
  type: str
  sample: /srv/build/builder
disk:
  description: Absolute path of C(disk.img), the raw disk to give QEMU.
  returned: when state=present
  type: str
  sample: /srv/build/builder/disk.img
format:
  description: Format of O(path)'s disk, always C(raw).
  returned: when state=present
  type: str
  sample: raw
machine:
  description: The validated machine definition (C(machine.json), version 1).
  returned: when state=present and the machine is known (not in check mode with O(from_archive))
  type: dict
  sample: {"version": 1, "memory": 4096, "network": "e1000", "graphics": "qxl-vga"}
disk_size:
  description: Apparent size of C(disk.img) in bytes.
  returned: when state=present and the image exists or would be created blank
  type: int
created:
  description: Whether O(path) was (or, in check mode, would be) created.
  returned: when state=present
  type: bool
dest:
  description: Absolute path of the archive.
  returned: when O(dest) is given
  type: str
  sample: /srv/releases/builder-2026-11.tar.zst
digest:
  description: C(sha256:<hex>) of the archive at O(dest).
  returned: when O(dest) is given, except in check mode when a pack is pending
  type: str
  sample: sha256:0f343b0931126a20f133d67c2b018a3b7b9f8f7e2c6a1d6b0d6e1c4e8f9a7b2c
archive_size:
  description: Size of the archive in bytes.
  returned: when O(dest) is given, except in check mode when a pack is pending
  type: int
virtual_size:
  description: Virtual size of the packed disk in bytes (the size of C(disk.img)).
  returned: when O(dest) is given and the image exists
  type: int
data_size:
  description: Bytes of data (not holes) in the packed disk.
  returned: when O(dest) is given, except in check mode when a pack is pending
  type: int
packed:
  description: Whether this run compressed the disk. V(false) when the sidecar showed O(dest) up to date.
  returned: when O(dest) is given
  type: bool
previous_digest:
  description: Digest of the archive that was at O(dest) before, when it was known.
  returned: when O(dest) is given and held a recorded archive
  type: str
pack_reason:
  description: Why a pack was (or would be) needed.
  returned: when O(dest) is given and a pack was needed
  type: str
  sample: "changed since the last pack: disk"
removed:
  description: Whether O(path) was removed.
  returned: when state=absent
  type: bool
holders:
  description: The processes using the disk when packing or removing was refused (C(pid), C(command), C(fd),
    C(writable), C(locks)).
  returned: on failure because the image is in use
  type: list
  elements: dict
elapsed:
  description: Seconds the module spent.
  returned: always
  type: float
error_kind:
  description:
    - On failure, the class of the failure, for playbooks to branch on without parsing C(msg); the collection's
      guide (C(docs/guide.md), section Troubleshooting) describes every kind with example messages.
    - Typical values for this module are V(not_found), V(in_use), V(invalid_option), V(invalid_archive),
      V(unsafe_image), V(limit_exceeded), V(invalid_machine), V(qemu_img), V(error), V(no_space) and
      V(permission). V(internal) is a bug.
  returned: on failure
  type: str
  sample: in_use
'''

import os
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import DEFAULT_LIMITS, GIB
from ansible_collections.vmimage.qemu.plugins.module_utils._modules.common import error_result
from ansible_collections.vmimage.qemu.plugins.module_utils._mutable.mutable_image import (
    DEFAULT_LEVEL, DEFAULT_MAX_SIZE_GIB, FORMAT, MutableImage, blank_machine, check_package_options,
)


def _image_facts(image, source=None, machine=None, disk_size=None):
    if source is not None:
        machine, disk_size = source.machine, source.disk_size
    facts = dict(path=image.path, disk=image.disk, format=FORMAT)
    if machine is not None:
        facts['machine'] = machine
    if disk_size is not None:
        facts['disk_size'] = disk_size
    return facts


def _absent(module, image, started):
    # One decision (plan_dispose): check mode reports it, a real run applies it.
    plan = image.remove(force=module.params['force'], check_mode=module.check_mode)
    result = dict(changed=plan.remove, path=image.path, removed=plan.remove and not module.check_mode)
    if module._diff:
        result['diff'] = dict(before={'path': image.path, 'state': 'present' if plan.remove else 'absent'},
                              after={'path': image.path, 'state': 'absent'})
    result['elapsed'] = round(time.monotonic() - started, 3)
    module.exit_json(**result)


def _create(module, image):
    """Create the image (or, in check mode, say what would be created).
    Returns the CreatePlan and the facts of the new image."""
    p = module.params
    plan = image.plan_create(size_gib=p['size_gib'], machine=p['machine'], max_size_gib=p['max_size_gib'],
                             archive=p['from_archive'], use_qemu_img=p['validate_with_qemu_img'])
    if plan.disk_size is not None and plan.disk_size > DEFAULT_LIMITS.max_member_size:
        module.warn('a %d GiB disk is larger than the %d GiB vm_image_fetch accepts by default'
                    % (plan.size_gib, DEFAULT_LIMITS.max_member_size // GIB))
    if module.check_mode:
        return plan, _image_facts(image, machine=plan.machine, disk_size=plan.disk_size)
    image.create(plan)
    return plan, _image_facts(image, image.inspect())


def _pack_result(packed):
    result = dict(dest=packed.dest, packed=packed.packed)
    for key, value in (('digest', packed.digest), ('archive_size', packed.archive_size),
                       ('virtual_size', packed.virtual_size), ('data_size', packed.data_bytes),
                       ('previous_digest', packed.previous_digest), ('pack_reason', packed.reason)):
        if value is not None:
            result[key] = value
    return result


def _present(module, image, started):
    p = module.params
    before = {'path': image.path}
    after = {'path': image.path}
    creation = None
    if not image.exists():
        creation, facts = _create(module, image)
        before['state'] = 'absent'
        after['state'] = 'present'
        after['disk_size'] = facts.get('disk_size')
        after['machine'] = facts.get('machine')
    else:
        if not module.check_mode and p['dest'] is None:
            # What killed tasks left beside the image goes, even when this
            # run only looks at it (a pack collects on its own).
            image.collect()
        source = image.inspect()
        facts = _image_facts(image, source)
        if p['size_gib'] is not None and p['machine'] is not None and blank_machine(p['machine']) != source.machine:
            module.warn('machine differs from %s; size_gib and machine only apply when path does not exist'
                        % image.machine_path)
    created = creation is not None
    result = dict(changed=created, created=created)
    result.update(facts)

    if p['dest'] is not None:
        dest = os.path.abspath(p['dest'])
        if module.check_mode:
            # The plan of the pack, made as the real run makes it (of the
            # image the creation plan would make, if it is still missing).
            packed = image.plan_package(dest, level=p['compression_level'], force=p['force'],
                                        creation=creation).result()
        else:
            packed = image.package(dest, level=p['compression_level'], threads=p['threads'], force=p['force'])
        result.update(_pack_result(packed))
        result['changed'] = result['changed'] or packed.changed
        before['dest_digest'] = packed.previous_digest or ('(absent)' if not os.path.exists(dest) else '(unknown)')
        after['dest_digest'] = packed.digest or '(new archive)'
    if module._diff:
        result['diff'] = dict(before=before, after=after)
    result['elapsed'] = round(time.monotonic() - started, 3)
    module.exit_json(**result)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type='path', required=True),
            state=dict(type='str', choices=['present', 'absent'], default='present'),
            size_gib=dict(type='int'),
            machine=dict(type='dict'),
            max_size_gib=dict(type='int', default=DEFAULT_MAX_SIZE_GIB),
            from_archive=dict(type='path'),
            validate_with_qemu_img=dict(type='bool', default=True),
            dest=dict(type='path'),
            compression_level=dict(type='int', default=DEFAULT_LEVEL),
            threads=dict(type='int', default=0),
            force=dict(type='bool', default=False),
        ),
        mutually_exclusive=[('size_gib', 'from_archive'), ('machine', 'from_archive')],
        required_by={'machine': 'size_gib'},
        supports_check_mode=True,
    )
    p = module.params
    started = time.monotonic()
    image = MutableImage(p['path'])
    try:
        check_package_options(p['state'], dest=p['dest'], compression_level=p['compression_level'],
                              max_size_gib=p['max_size_gib'])
        if p['state'] == 'absent':
            _absent(module, image, started)
        _present(module, image, started)
    except Exception as exc:  # every failure gets an error_kind (error_result)
        module.fail_json(path=image.path, elapsed=round(time.monotonic() - started, 3), **error_result(exc))


if __name__ == '__main__':
    main()
