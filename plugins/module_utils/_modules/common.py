# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Option specs and result shaping shared by the modules.

Plain data and functions only (no AnsibleModule): the modules build their
argument_spec from these pieces, matching the doc fragments of the same names.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import traceback
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import VmImageError, os_error
from ansible_collections.vmimage.qemu.plugins.module_utils._core.layout import DEFAULT_STORE  # noqa: F401 (re-exported)

# Same value as store.DEFAULT_STORE (a test checks it), written out so that
# option specs import nothing heavy.

STORE_ARGUMENT_SPEC = dict(
    store=dict(type='path', default=DEFAULT_STORE),
)

HTTP_ARGUMENT_SPEC = dict(
    headers=dict(type='dict', default={}),
    url_username=dict(type='str'),
    url_password=dict(type='str', no_log=True),
    validate_certs=dict(type='bool', default=True),
    ca_path=dict(type='path'),
    client_cert=dict(type='path'),
    client_key=dict(type='path', no_log=False),
    timeout=dict(type='int', default=30),
    retries=dict(type='int', default=8),
    force_basic_auth=dict(type='bool', default=False),
    use_proxy=dict(type='bool', default=True),
    use_netrc=dict(type='bool', default=True),
    # None: download.DEFAULT_HTTP_AGENT, which names this collection's version.
    http_agent=dict(type='str'),
    unredirected_headers=dict(type='list', elements='str', default=[]),
)


def argument_spec(*parts, **own):
    spec = {}
    for part in parts:
        spec.update(part)
    spec.update(own)
    return spec


def download_options(params):
    """The HTTP options of a module's params, as open_download() keywords."""
    return dict(
        headers=params.get('headers') or None,
        url_username=params.get('url_username'),
        url_password=params.get('url_password'),
        validate_certs=params.get('validate_certs', True),
        ca_path=params.get('ca_path'),
        client_cert=params.get('client_cert'),
        client_key=params.get('client_key'),
        force_basic_auth=params.get('force_basic_auth', False),
        use_proxy=params.get('use_proxy', True),
        use_netrc=params.get('use_netrc', True),
        http_agent=params.get('http_agent'),
        unredirected_headers=params.get('unredirected_headers') or None,
    )


def error_result(exc):
    """fail_json keywords for any exception a module caught: ``msg`` and
    ``error_kind``, plus ``holders`` for in-use errors that name processes.

    Library errors carry their kind.  An operating-system error the library
    did not translate still gets one (no_space, permission, ...) as a last
    resort; anything else is a bug, reported as 'internal' with its class
    and, for -vvv, its traceback (call this inside the except block).
    """
    if isinstance(exc, OSError) and not isinstance(exc, VmImageError) and exc.errno is not None:
        exc = os_error(exc, 'complete the task')
    if isinstance(exc, VmImageError):
        result = dict(msg=str(exc), error_kind=exc.kind)
    else:
        result = dict(msg='%s: %s' % (type(exc).__name__, exc), error_kind='internal',
                      exception=traceback.format_exc())
    # In-use errors name the processes holding a disk; playbooks may act on them.
    holders = getattr(exc, 'holders', None)
    if holders is not None:
        result['holders'] = holders
    return result


def image_result(store, digest, alias=None):
    """The fields every module returns about one stored image."""
    record = store.get_record(digest)
    if record is None:
        return {}
    info = store.describe(record)
    return dict(
        image_id=alias,
        digest=digest,
        path=info['path'],
        disk=info['disk'],
        layer=info['layer'],
        machine=record.get('machine'),
        virtual_size=record.get('virtual_size'),
        allocated_size=record.get('allocated_size'),
        apparent_size=record.get('apparent_size'),
    )
