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
  - Read-only; never reports a change. A missing store is reported as empty.
author:
  - vmimage.qemu developers
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
      - Narrow the report to one image, by name (alias) or by C(sha256:<hex>) digest.
      - Fails when no such image exists.
    type: str
requirements:
  - Python 3.9 or newer on the target
seealso:
  - module: vmimage.qemu.vm_image_fetch
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
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmimage.qemu.plugins.module_utils.errors import VmImageError
from ansible_collections.vmimage.qemu.plugins.module_utils.module_common import (
    STORE_ARGUMENT_SPEC, argument_spec, error_result,
)
from ansible_collections.vmimage.qemu.plugins.module_utils.store import ImageStore

_REPORTED = ('digest', 'aliases', 'source', 'fetched_at', 'last_used', 'apparent_size', 'allocated_size',
             'virtual_size', 'validator_version', 'path', 'disk', 'layer', 'instances', 'parent')


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(STORE_ARGUMENT_SPEC, image=dict(type='str')),
        supports_check_mode=True,
    )
    p = module.params
    try:
        store = ImageStore(p['store'], create=False)
        result = dict(changed=False, store=store.root, exists=store.exists, images=[],
                      usage=dict(images=0, aliases=0, apparent_size=0, allocated_size=0, virtual_size=0))
        if not store.exists:
            if p['image']:
                module.fail_json(msg='no image %r: store %s does not exist' % (p['image'], store.root), **result)
            module.exit_json(**result)
        aliases = store.aliases()
        if p['image']:
            records = [store.get_record(store.resolve(p['image']))]
        else:
            records = list(store.iter_records())
        for record in records:
            info = store.describe(record, aliases)
            result['images'].append(dict((k, info.get(k)) for k in _REPORTED))
        result['usage'] = store.usage()
        module.exit_json(**result)
    except VmImageError as exc:
        module.fail_json(**error_result(exc))


if __name__ == '__main__':
    main()
