# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Which values of a download's options are secrets that no result,
message or log may show.  Kept apart from download.py so that a module can
mask them before anything imports the HTTP stack."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

from urllib.parse import unquote, urlsplit

_SECRET_HEADER_NAMES = frozenset(['authorization', 'proxy-authorization', 'cookie'])
_SECRET_HEADER_RE = re.compile(r'(?i)token|secret|key|auth|password')


def is_secret_header(name):
    """Whether a header's value is a secret that no result or message may show:
    Authorization, Proxy-Authorization, Cookie and any header whose name holds
    token, secret, key, auth or password."""
    name = str(name).lower()
    return name in _SECRET_HEADER_NAMES or _SECRET_HEADER_RE.search(name) is not None


def secret_values(params):
    """The secrets in a module's params that no_log cannot mark, for
    ``module.no_log_values``: values of secret headers (is_secret_header)
    in ``headers`` and in mirror entries, mirror passwords (any key of a mirror
    entry named like a secret header), and passwords in the userinfo of
    ``url`` and of the mirrors.  Ansible's no_log reaches
    nested options only of ``elements: dict`` lists, and ``mirrors`` also
    takes strings.  Never raises on malformed params: it runs before they
    are checked."""
    found = set()

    def add_headers(headers):
        if isinstance(headers, dict):
            found.update(str(value) for name, value in headers.items()
                         if is_secret_header(name) and value not in (None, ''))

    def add_url(url):
        try:
            password = urlsplit(url).password if isinstance(url, str) else None
        except ValueError:
            return
        if password:
            found.update((password, unquote(password)))

    add_headers(params.get('headers'))
    add_url(params.get('url'))
    mirrors = params.get('mirrors')
    for entry in mirrors if isinstance(mirrors, (list, tuple)) else ():
        if isinstance(entry, dict):
            add_url(entry.get('url'))
            add_headers(entry.get('headers'))
            # url_password, and a misspelt key that says it holds a secret:
            # the entry is refused, but the invocation still shows it.
            add_headers(dict((key, value) for key, value in entry.items()
                             if key != 'headers' and isinstance(value, (str, int, float))))
        else:
            add_url(entry)
    return found
