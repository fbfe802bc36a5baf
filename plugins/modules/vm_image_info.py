#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: vm_image_info
short_description: Report the images, aliases, instances and usage of a host's image store
version_added: 0.1.0
description:
  - Lists the images in the image store with their digest, names (aliases), source, fetch time, last use,
    apparent, allocated and virtual size, and the store's usage totals.
  - Lists the VM instances (see M(vmimage.qemu.vm_image_instance)) with their image, disk, MAC and the processes
    holding their disk, and counts the instances of each image.
  - Read-only; never reports a change. A missing store is reported as empty.
author:
  - vmimage.qemu developers (@vmimage)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - vmimage.qemu.store
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  image:
    description:
      - Narrow the report to one image, by name (alias) or by C(sha256:<hex>) digest, and its instances.
      - Fails when no such image exists.
    type: str
requirements:
  - Python 3.9 or newer on the target
  - Linux C(/proc) (for the owners of instance disks)
seealso:
  - module: vmimage.qemu.vm_image_fetch
  - module: vmimage.qemu.vm_image_instance
'''

EXAMPLES = r'''
- name: What is cached on this hypervisor?
  vmimage.qemu.vm_image_info:
  register: cache

- name: Show usage
  ansible.builtin.debug:
    msg: "{{ cache.usage.images }} images, {{ (cache.usage.allocated_size / 2**30) | round(1) }} GiB on disk"

- name: One image
  vmimage.qemu.vm_image_info:
    image: builder
  register: builder

- name: Instances whose VM is running
  ansible.builtin.debug:
    msg: "{{ cache.instances | selectattr('owners') | map(attribute='name') | list }}"
'''

RETURN = r'''
store:
  description: The store folder.
  returned: always
  type: str
exists:
  description: Whether the store folder exists.
  returned: always
  type: bool
images:
  description: The images (only the one asked for when O(image) is set), ordered by digest.
  returned: always
  type: list
  elements: dict
  contains:
    digest:
      description: C(sha256:<hex>) of the archive.
      type: str
    aliases:
      description: Names pointing at the image.
      type: list
      elements: str
    source:
      description: URL the image was fetched from, without credentials.
      type: str
    fetched_at:
      description: UTC time of the fetch (ISO 8601).
      type: str
    last_used:
      description: UTC time the image was last fetched or used.
      type: str
    apparent_size:
      description: Sum of the apparent sizes of the image's files.
      type: int
    allocated_size:
      description: Bytes the image occupies on disk.
      type: int
    virtual_size:
      description: Virtual size of the disk.
      type: int
    validator_version:
      description: Version of the validator that accepted the image.
      type: int
    path:
      description: Folder of the image.
      type: str
    instances:
      description: Number of instances using the image.
      type: int
instances:
  description: The instances (only those of O(image) when it is set), ordered by name.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Name of the instance.
      type: str
    image:
      description: The image reference (name or digest) the instance was created with.
      type: str
    digest:
      description: C(sha256:<hex>) of the image the instance uses.
      type: str
    disk:
      description: Absolute path of the instance's qcow2 disk.
      type: str
    mac:
      description: MAC address of the instance.
      type: str
    uuid:
      description: uuid of the instance.
      type: str
    created_at:
      description: UTC time the instance was created (ISO 8601).
      type: str
    owners:
      description: Processes holding the disk (QEMU's image lock, or open for writing), each with C(pid),
        C(command) (program name), C(fd), C(writable) and C(locks), as M(vmimage.qemu.vm_image_instance) reports them.
      type: list
      elements: dict
usage:
  description: Totals for the store.
  returned: always
  type: dict
  contains:
    images:
      description: Number of images.
      type: int
    aliases:
      description: Number of names.
      type: int
    apparent_size:
      description: Sum of apparent sizes.
      type: int
    allocated_size:
      description: Sum of allocated sizes.
      type: int
    virtual_size:
      description: Sum of virtual sizes.
      type: int
    instances:
      description: Number of instances.
      type: int
error_kind:
  description:
    - On failure, the class of the failure, for playbooks to branch on without parsing C(msg); the collection's
      guide (C(docs/guide.md), section Troubleshooting) describes every kind with example messages.
    - Typical values for this module are V(not_found), V(store) and V(permission). V(internal) is a bug.
  returned: on failure
  type: str
  sample: not_found
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmimage.qemu.plugins.module_utils._instance.instance import InstanceManager
from ansible_collections.vmimage.qemu.plugins.module_utils._modules.common import (
    STORE_ARGUMENT_SPEC, argument_spec, error_result,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore

_REPORTED = ('digest', 'aliases', 'source', 'fetched_at', 'last_used', 'apparent_size', 'allocated_size',
             'virtual_size', 'validator_version', 'path', 'disk', 'layer', 'instances', 'parent')


def _instances(manager, records, digests):
    """The instances (of ``digests`` only, unless None) with the owners of
    their disks, found in one pass over /proc."""
    records = [r for r in records if digests is None or r.get('digest') in digests]
    owners = manager.owners_of_all([r['name'] for r in records])
    return [dict(name=r['name'], image=r.get('image_id'), digest=r.get('digest'), disk=manager.disk_path(r['name']),
                 mac=r.get('mac'), uuid=r.get('uuid'), created_at=r.get('created_at'), owners=owners[r['name']])
            for r in records]


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(STORE_ARGUMENT_SPEC, image=dict(type='str')),
        supports_check_mode=True,
    )
    p = module.params
    store = ImageStore(p['store'], create=False)
    result = dict(changed=False, store=store.root, exists=store.exists, images=[], instances=[],
                  usage=dict(images=0, aliases=0, apparent_size=0, allocated_size=0, virtual_size=0,
                             instances=0))
    try:
        if p['image']:
            # NotFoundError, also when there is no store at all.
            records = [store.get_record(store.resolve(p['image']))]
        elif not store.exists:
            module.exit_json(**result)
        else:
            records = list(store.iter_records())
        for record in records:
            info = store.describe(record)
            result['images'].append(dict((k, info.get(k)) for k in _REPORTED))
        manager = InstanceManager(store)
        instances = manager.list()
        result['instances'] = _instances(manager, instances, set(r['digest'] for r in records) if p['image'] else None)
        result['usage'] = store.usage()
        result['usage']['instances'] = len(instances)
        module.exit_json(**result)
    except Exception as exc:  # every failure gets an error_kind (error_result)
        module.fail_json(store=store.root, exists=store.exists, **error_result(exc))


if __name__ == '__main__':
    main()
