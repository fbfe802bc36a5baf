#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r'''
---
module: vm_image_fetch
short_description: Download a QEMU image archive once, verify and validate it, and keep it in the host's image store
version_added: 0.1.0
description:
  - Makes O(image_id) name a validated copy of the C(image.tar.zst) archive at O(url) in the image store on the target.
  - The archive is downloaded, hashed, decompressed and extracted in one pass into a private staging folder,
    checked against O(checksum), validated as untrusted input (tar members, sparse maps, C(machine.json) schema,
    qcow2 layer backed exactly by C(disk.img) as raw, no foreign format signature on the raw disk, then
    C(qemu-img) under CPU and memory limits), and only then renamed into the store.
  - Any number of processes asking for the same image at once cause one download; the others wait and use it.
  - When the image is present the module does no network I/O and does not hash the image again.
author:
  - vmimage.qemu developers (@vmimage)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - vmimage.qemu.store
  - vmimage.qemu.http
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
options:
  url:
    description:
      - Where the archive is. C(http://), C(https://), C(file://) or an absolute path on the target.
      - User information in the URL is used for authentication and stripped from every result.
      - It, O(url_username), O(url_password) and O(headers) are sent only to the origin (scheme, host and port)
        of this URL; see O(mirrors) and O(checksum) for the other URLs.
      - Required when O(state=present), and when O(state=absent) without O(image_id).
    type: str
  mirrors:
    description:
      - Sources tried in order before O(url). The first that answers is used for the whole download.
      - Each entry is either a URL, or a dict with the key C(url) and optionally the keys C(url_username),
        C(url_password) and C(headers) (a dict), which work as the options of the same names but only for
        that mirror's origin.
      - A URL entry gets the credentials and headers of O(url) (O(url_username), O(url_password), user
        information in O(url), O(headers)) only when it has the same origin (scheme, host and port) as O(url);
        a dict entry gets exactly its own, none of O(url)'s.
      - Passwords, user information passwords and secret header values (see O(headers)) of the entries are
        never shown in results or in the logged invocation.
      - An entry that is neither a URL nor such a dict fails with RV(error_kind=invalid_option) naming it
        (C(mirrors[1])).
    type: list
    elements: raw
    default: []
  checksum:
    description:
      - Expected digest of the archive, C(<algorithm>:<hex>) (V(sha256) or V(sha512) recommended), or
        C(<algorithm>:<URL>) of a checksum file in GNU (C(<hex>  <name>)) or BSD (C(SHA256 (<name>) = <hex>)) format,
        looked up by the file name of O(url).
      - The checksum file URL gets the credentials and headers of O(url) only when it has the same origin
        (scheme, host and port); give credentials in its own user information otherwise.
      - With a hex digest, an image with that digest already in the store is used without any download.
      - A mismatch fails and leaves nothing behind.
    type: str
  image_id:
    description:
      - Name (alias) for the image in the store. Defaults to C(url:<url>).
      - Several names may point at one image; the image is stored once.
    type: str
  state:
    description:
      - V(present) makes O(image_id) point at the image from O(url).
      - V(absent) removes O(image_id), and the image itself when no other name refers to it.
        Refused while instances or child images use the image.
      - With O(state=absent), O(image_id) may also be a C(sha256:<hex>) digest. The image is then removed with every
        name pointing at it (RV(removed_aliases)), for example one that lost its last name when an alias moved to a
        new release. M(vmimage.qemu.vm_image_prune) removes all such images at once.
    type: str
    choices: [present, absent]
    default: present
  force:
    description:
      - Download again even when the image is present, and point O(image_id) at the result.
    type: bool
    default: false
  validate_with_qemu_img:
    description:
      - After the pure-Python checks, also cross-check the image with C(qemu-img info) (resource limited).
    type: bool
    default: true
requirements:
  - Python 3.9 or newer on the target
  - zstandard (Python library)
  - requests (Python library)
  - qemu-img (package qemu-utils), unless O(validate_with_qemu_img=false)
notes:
  - The store keeps images by the sha256 of their archive, so the same content fetched under two names is stored once.
seealso:
  - module: vmimage.qemu.vm_image_info
  - module: vmimage.qemu.vm_image_instance
'''

EXAMPLES = r'''
- name: Cache the build image on every hypervisor
  vmimage.qemu.vm_image_fetch:
    url: https://images.example.com/builder/2026-11/image.tar.zst
    checksum: sha256:0f343b0931126a20f133d67c2b018a3b7b9f8f7e2c6a1d6b0d6e1c4e8f9a7b2c
    image_id: builder

- name: Verify against a published SHA256SUMS file, trying a local mirror first
  vmimage.qemu.vm_image_fetch:
    url: https://images.example.com/builder/2026-11/image.tar.zst
    mirrors:
      - http://cache.lan/builder/2026-11/image.tar.zst
    checksum: sha256:https://images.example.com/builder/2026-11/SHA256SUMS
    image_id: builder

- name: Private registry with basic auth
  vmimage.qemu.vm_image_fetch:
    url: https://registry.example.com/images/win11.tar.zst
    url_username: ci
    url_password: "{{ vault_registry_password }}"
    image_id: win11

- name: A token for the primary, other credentials for a mirror, none for a public mirror
  vmimage.qemu.vm_image_fetch:
    url: https://registry.example.com/images/win11.tar.zst
    headers:
      Authorization: "Bearer {{ vault_registry_token }}"
    mirrors:
      - url: https://cache.lan/images/win11.tar.zst
        url_username: cache
        url_password: "{{ vault_cache_password }}"
      - https://mirror.example.org/images/win11.tar.zst
    image_id: win11

- name: Drop an image that no instance uses any more
  vmimage.qemu.vm_image_fetch:
    image_id: builder
    state: absent
'''

RETURN = r'''
image_id:
  description: The name of the image in the store.
  returned: always
  type: str
  sample: builder
digest:
  description: C(sha256:<hex>) of the archive, which identifies the image in the store.
  returned: when state=present and not in check mode with a pending download
  type: str
  sample: sha256:0f343b0931126a20f133d67c2b018a3b7b9f8f7e2c6a1d6b0d6e1c4e8f9a7b2c
path:
  description: Folder of the stored image (read-only).
  returned: when the image is in the store
  type: str
  sample: /var/lib/vm-images/images/0f343b0931126a20f133d67c2b018a3b7b9f8f7e2c6a1d6b0d6e1c4e8f9a7b2c
disk:
  description: Absolute path of the raw C(disk.img).
  returned: when the image is in the store
  type: str
layer:
  description: Absolute path of C(layer.qcow2) (backed by C(disk.img)); instances are overlays of it.
  returned: when the image is in the store
  type: str
machine:
  description: The validated machine definition (C(machine.json), version 1).
  returned: when the image is in the store
  type: dict
  sample: {"version": 1, "memory": 2048, "network": "e1000"}
virtual_size:
  description: Virtual size of the image's disk in bytes.
  returned: when the image is in the store
  type: int
allocated_size:
  description: Bytes the image occupies on disk (its sparse files' allocated blocks).
  returned: when the image is in the store
  type: int
apparent_size:
  description: Sum of the apparent sizes of the image's files in bytes.
  returned: when the image is in the store
  type: int
downloaded:
  description: Whether this run downloaded the archive.
  returned: always
  type: bool
source:
  description: The URL the archive came from, without credentials.
  returned: when state=present
  type: str
elapsed:
  description: Seconds the module spent.
  returned: always
  type: float
removed_digest:
  description: Digest of the image removed from the store with its last name (or by its digest).
  returned: when state=absent and the image was removed
  type: str
removed_aliases:
  description: The names removed with the image, when O(image_id) was a digest.
  returned: when state=absent and O(image_id) is a C(sha256:<hex>) digest
  type: list
  elements: str
error_kind:
  description:
    - On failure, the class of the failure, for playbooks to branch on without parsing C(msg); the collection's
      guide (C(docs/guide.md), section Troubleshooting) describes every kind with example messages.
    - Typical values for this module are V(download), V(checksum_mismatch), V(invalid_archive), V(unsafe_image),
      V(limit_exceeded), V(invalid_machine), V(qemu_img), V(in_use), V(store), V(invalid_option),
      V(missing_library), V(no_space) and V(permission). V(internal) is a bug.
  returned: on failure
  type: str
  sample: download
'''

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmimage.qemu.plugins.module_utils._transfer.download import redact_url
from ansible_collections.vmimage.qemu.plugins.module_utils._modules.common import (
    HTTP_ARGUMENT_SPEC, STORE_ARGUMENT_SPEC, argument_spec, download_options, error_result, image_result,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._transfer.secrets import secret_values
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore, parse_digest


def _diff(alias, before, after):
    return dict(before='%s: %s\n' % (alias, before or '(absent)'),
                after='%s: %s\n' % (alias, after or '(absent)'))


class _FetchModule(AnsibleModule):
    """AnsibleModule that knows the secrets no_log cannot mark (secret_values:
    URL userinfo, secret headers, mirror passwords) before it logs the
    invocation on the target, which __init__ does; results, the invocation
    they carry and errors are then masked like no_log options."""

    def _log_invocation(self):
        self.no_log_values.update(secret_values(self.params))
        super(_FetchModule, self)._log_invocation()


def main():
    module = _FetchModule(
        argument_spec=argument_spec(
            STORE_ARGUMENT_SPEC, HTTP_ARGUMENT_SPEC,
            url=dict(type='str'),
            # Strings or dicts (download.check_mirrors checks them): no_log
            # cannot reach into raw elements, secret_values() masks instead.
            mirrors=dict(type='list', elements='raw', default=[]),
            checksum=dict(type='str'),
            image_id=dict(type='str'),
            state=dict(type='str', choices=['present', 'absent'], default='present'),
            force=dict(type='bool', default=False),
            validate_with_qemu_img=dict(type='bool', default=True),
        ),
        required_if=[('state', 'present', ('url',))],
        required_one_of=[('url', 'image_id')],
        supports_check_mode=True,
    )
    p = module.params
    # Again here: without _log_invocation (module-wide no_log) the results still need it.
    module.no_log_values.update(secret_values(p))
    started = time.monotonic()
    image_id = p['image_id'] or 'url:' + redact_url(p['url'])
    try:
        store = ImageStore(p['store'], use_qemu_img=p['validate_with_qemu_img'], create=not module.check_mode)
        if p['state'] == 'absent':
            if not store.exists:
                module.exit_json(changed=False, image_id=image_id, downloaded=False,
                                 elapsed=round(time.monotonic() - started, 3))
            if parse_digest(image_id):
                changed, aliases = store.remove_image(image_id, check_mode=module.check_mode)
                result = dict(changed=changed, image_id=image_id, downloaded=False, removed_aliases=aliases)
                if changed:
                    result['removed_digest'] = image_id
                if module._diff:
                    result['diff'] = _diff(image_id, image_id if changed else None, None)
            else:
                before = store.get_alias(image_id)
                changed, removed = store.remove_alias(image_id, check_mode=module.check_mode)
                result = dict(changed=changed, image_id=image_id, downloaded=False)
                if removed:
                    result['removed_digest'] = removed
                if module._diff:
                    result['diff'] = _diff(image_id, before and before['digest'], None)
            result['elapsed'] = round(time.monotonic() - started, 3)
            module.exit_json(**result)

        if not store.exists:
            # Check mode on a host without a store: everything would be created.
            module.exit_json(changed=True, image_id=image_id, downloaded=False, source=redact_url(p['url']),
                             elapsed=round(time.monotonic() - started, 3))
        fetched = fetch_image(
            store, p['url'], mirrors=p['mirrors'], checksum=p['checksum'], alias=image_id, force=p['force'],
            check_mode=module.check_mode, retries=p['retries'], timeout=p['timeout'],
            download_options=download_options(p),
        )
        result = dict(changed=fetched.changed, image_id=fetched.alias, downloaded=fetched.downloaded,
                      source=fetched.source)
        if fetched.digest:
            result.update(image_result(store, fetched.digest, fetched.alias))
        if module._diff:
            result['diff'] = _diff(fetched.alias, fetched.previous_digest,
                                   fetched.digest or '(new image from %s)' % fetched.source)
        result['elapsed'] = round(time.monotonic() - started, 3)
        module.exit_json(**result)
    except Exception as exc:  # every failure gets an error_kind (error_result)
        module.fail_json(image_id=image_id, elapsed=round(time.monotonic() - started, 3), **error_result(exc))


if __name__ == '__main__':
    main()
