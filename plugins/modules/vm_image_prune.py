#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: vm_image_prune
short_description: Remove cached VM images nothing uses, keeping a hypervisor's image store within budget
version_added: 0.1.0
description:
  - A mark and sweep over the image store's reference records. An image is kept when it is reached from a root, and
    so is every ancestor of a kept image. The roots are its aliases (names; unless O(unused_for) expires them or
    O(keep_below) needs the room), its instances (M(vmimage.qemu.vm_image_instance)), child and mutable images built
    on it, a running operation holding it (an instance being created), a live process holding one of its files
    (a running VM), the images in O(keep), and images fetched less than O(min_age) ago.
  - Everything else is removed, each image with its aliases (no alias is left pointing at nothing), children before
    their parents. Each removal is one rename out of the store, then deletion, so a killed run never leaves a half
    image.
  - The decision and the removals happen under the store lock, which fetches, alias changes and instance creation
    take too, so a concurrent fetch or instance creation never loses an image it is about to use.
  - A running VM counts as a use of its image now, so an image a VM has been running on for a month is recent.
  - Also removes what killed processes left in the store (staging folders whose owner died, trash, record
    temporaries older than O(debris_grace)), and reports it in RV(collected); and image folders without a valid
    record (a hand-edited store, a damaged disk) older than O(debris_grace), reported in RV(removed).
  - Check mode returns exactly what a real run would do (the same decision), writing nothing.
author:
  - vmimage.qemu developers (@vmimage)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - vmimage.qemu.store
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
options:
  unreferenced:
    description:
      - Remove the images no root reaches.
      - With V(false) only O(unused_for) and O(keep_below) remove anything.
    type: bool
    default: true
  unused_for:
    description:
      - Also expire images that have aliases but were not used for this long, their aliases with them.
      - A use is a fetch that found the image, an instance created from it, a VM running on it.
      - A number of seconds, or a number with C(s), C(m), C(h) or C(d), for example V(30d).
      - Images with instances, children, holders or in O(keep) are never expired.
    type: raw
  keep_below:
    description:
      - A budget for the whole store folder (allocated bytes, what C(du) counts). While the store is above it, images
        kept only by their aliases are removed, least recently used first.
      - Bytes, a size with C(KiB), C(MiB), C(GiB) or C(TiB) (for example V(200GiB)), or a percentage of the store's
        file system (for example V(80%)).
      - Never removes an image kept by anything other than an alias; the store can stay above the budget.
    type: raw
  keep:
    description:
      - Aliases or C(sha256:<hex>) digests to keep whatever the policies say (pins).
    type: list
    elements: str
    default: []
  min_age:
    description:
      - Keep images fetched less than this long ago, the window between a fetch and the instance that will use it.
      - Seconds, or a number with C(s), C(m), C(h) or C(d).
    type: raw
    default: 1h
  debris_grace:
    description:
      - Record temporaries (C(.tmp-*)) left by killed processes, and image folders without a valid record, are
        removed once older than this. Staging folders are removed as soon as their owner is gone, whatever their age.
      - Seconds, or a number with C(s), C(m), C(h) or C(d).
    type: raw
    default: 1h
requirements:
  - Python 3.9 or newer on the target
  - Linux C(/proc) (for the processes holding image files)
seealso:
  - module: vmimage.qemu.vm_image_fetch
  - module: vmimage.qemu.vm_image_info
  - module: vmimage.qemu.vm_image_instance
'''

EXAMPLES = r'''
- name: Nightly, after the new release was fetched under the same alias
  vmimage.qemu.vm_image_prune:

- name: Keep the store under 200 GiB and drop what was not used for a month
  vmimage.qemu.vm_image_prune:
    unused_for: 30d
    keep_below: 200GiB
    keep: [builder-lts]
  register: pruned

- name: Say what went
  ansible.builtin.debug:
    msg: "freed {{ pruned.freed_bytes }} bytes: {{ pruned.removed | map(attribute='digest') | join(', ') }}"

- name: What would a budget of 80 % of the disk remove?
  vmimage.qemu.vm_image_prune:
    keep_below: 80%
  check_mode: true
'''

RETURN = r'''
removed:
  description: The images removed (or that would be, in check mode), children before parents.
  returned: always
  type: list
  elements: dict
  contains:
    digest:
      description: C(sha256:<hex>) of the image.
      type: str
    aliases:
      description: Its aliases, removed with it.
      type: list
      elements: str
    bytes:
      description: What removing it frees (allocated bytes of its folder, records and aliases).
      type: int
    reason:
      description: Why, for example V(unreferenced), C(not used for 30d (alias nightly)) or
        C(over keep_below, least recently used (alias nightly)).
      type: str
    last_used:
      description: Its last use (UTC), V(null) when never recorded.
      type: str
  sample: [{"digest": "sha256:0f34...", "aliases": [], "bytes": 1181253632, "reason": "unreferenced",
            "last_used": "2026-11-30T03:00:12Z"}]
kept:
  description:
    - Every other image, with the reason it stays, for example C(alias builder), C(instance ci-3),
      C(parent of sha256:...), V(younger than min_age), V(in keep), C(held by pid 4242 (qemu-system-x86_64)),
      C(alias nightly, within budget).
  returned: always
  type: list
  elements: dict
  sample: [{"digest": "sha256:9c1e...", "aliases": ["builder"], "bytes": 1180000256, "reason": "alias builder",
            "last_used": "2026-12-01T03:00:40Z"}]
freed_bytes:
  description:
    - Bytes freed. In a real run measured on disk (the store's allocated bytes before minus after); in check mode
      the sum of RV(removed[].bytes).
  returned: always
  type: int
  sample: 1181253632
usage_before:
  description: Allocated bytes of the whole store folder before pruning (what C(du) counts).
  returned: always
  type: int
usage_after:
  description: Allocated bytes of the store folder after pruning (in check mode, as it would be).
  returned: always
  type: int
collected:
  description: Names of the debris of killed processes removed from the store (none in check mode).
  returned: always
  type: list
  elements: str
error_kind:
  description:
    - On failure, the class of the failure; the collection's guide (C(docs/guide.md), section Troubleshooting)
      describes every kind.
    - Typical values are V(invalid_option) (a bad duration or size), V(in_use) (the store lock was held for longer
      than an hour), V(store), V(permission).
  returned: on failure
  type: str
  sample: invalid_option
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmimage.qemu.plugins.module_utils._modules.common import (
    STORE_ARGUMENT_SPEC, argument_spec, error_result,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._store.prune import (
    PrunePolicy, parse_duration, prune_store,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore


def _summary(verdicts):
    return sorted('%s %s' % (v.digest, ','.join(v.aliases)) for v in verdicts)


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(
            STORE_ARGUMENT_SPEC,
            unreferenced=dict(type='bool', default=True),
            unused_for=dict(type='raw'),
            keep_below=dict(type='raw'),
            keep=dict(type='list', elements='str', default=[]),
            min_age=dict(type='raw', default='1h'),
            debris_grace=dict(type='raw', default='1h'),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        store = ImageStore(p['store'], create=False)
        policy = PrunePolicy.from_options(
            store.root if store.exists else '/', unreferenced=p['unreferenced'], unused_for=p['unused_for'],
            keep_below=p['keep_below'], keep=p['keep'], min_age=p['min_age'])
        grace = parse_duration(p['debris_grace'], 'debris_grace')
        if not store.exists:
            module.exit_json(changed=False, removed=[], kept=[], freed_bytes=0, usage_before=0, usage_after=0,
                             collected=[])
        if not module.check_mode:
            store.ensure()  # a store of an older format is upgraded first
        plan, usage_after, collected = prune_store(store, policy, check_mode=module.check_mode, debris_grace=grace)
        freed = plan.freed_bytes if module.check_mode else plan.usage_before - usage_after
        result = dict(
            changed=bool(plan.removed),
            removed=[v.as_dict() for v in plan.removed],
            kept=[v.as_dict() for v in plan.kept],
            freed_bytes=freed,
            usage_before=plan.usage_before,
            usage_after=usage_after,
            collected=collected,
        )
        if module._diff:
            result['diff'] = dict(before='\n'.join(_summary(plan.verdicts)) + '\n',
                                  after='\n'.join(_summary(plan.kept)) + '\n')
        module.exit_json(**result)
    except Exception as exc:  # every failure gets an error_kind (error_result)
        module.fail_json(**error_result(exc))


if __name__ == '__main__':
    main()
