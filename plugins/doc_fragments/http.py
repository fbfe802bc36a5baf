# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):

    DOCUMENTATION = r'''
options:
  headers:
    description:
      - Extra HTTP request headers, for example an C(Authorization) token.
      - Sent only to the origin (scheme, host and port, default ports included) of O(url), never to
        another origin a redirect leads to, to a mirror on another origin or to a checksum file elsewhere.
      - The values of C(Authorization), C(Proxy-Authorization), C(Cookie) and of every header whose name contains
        C(token), C(secret), C(key), C(auth) or C(password) (in any case) are masked like C(no_log) values in
        results, the logged invocation and error messages.
      - C(Range) and C(If-Range) are managed by the downloader for resuming and cannot be set.
    type: dict
    default: {}
  url_username:
    description:
      - User name for HTTP basic authentication. Overrides user information in the URL.
      - Like the password, sent only to the origin of O(url) (see O(headers)), and only once the server asked
        for it with a C(401) Basic challenge, unless O(force_basic_auth=true).
    type: str
  url_password:
    description:
      - Password for HTTP basic authentication. Never shown in results, errors or logs.
    type: str
  force_basic_auth:
    description:
      - Send Basic authentication with the first request instead of waiting for the server's C(401) challenge
        (a C(WWW-Authenticate) header naming C(Basic)). For servers that answer C(404) or C(403) to anonymous
        requests.
      - Still only to the origin the credentials belong to.
      - A C(401) for which no credentials were given, or which follows rejected credentials, fails with
        RV(error_kind=download).
    type: bool
    default: false
  use_proxy:
    description:
      - Use the proxies set in the environment (C(https_proxy), C(http_proxy), C(all_proxy), C(no_proxy)).
      - V(false) ignores them and connects directly.
    type: bool
    default: true
  use_netrc:
    description:
      - Take credentials for a host without any given from C(~/.netrc) (or the file C($NETRC) names) on the target.
      - An entry is used only for its own host, like other credentials after a C(401) Basic challenge unless
        O(force_basic_auth=true).
      - V(false) ignores the file.
    type: bool
    default: true
  http_agent:
    description:
      - The C(User-Agent) header.
      - Defaults to C(vmimage.qemu/<version of the collection>).
    type: str
  unredirected_headers:
    description:
      - Names of headers (in any case) not sent again once a request was redirected, even to the same origin.
        May include C(Authorization) to keep Basic authentication to the first URL.
      - Headers and credentials are never sent to another origin, whatever this list says.
    type: list
    elements: str
    default: []
  validate_certs:
    description:
      - Verify TLS certificates. Only set to V(false) on networks you control.
    type: bool
    default: true
  ca_path:
    description:
      - CA bundle file or folder used to verify the server certificate.
    type: path
  client_cert:
    description:
      - PEM client certificate for TLS client authentication; may also contain the key.
    type: path
  client_key:
    description:
      - PEM private key for O(client_cert) when it is not in the certificate file.
    type: path
  timeout:
    description:
      - Seconds to wait for a connection and for each read before the attempt counts as failed.
    type: int
    default: 30
  retries:
    description:
      - Retries after the first attempt on transport errors, HTTP 5xx, 408 and 429, with
        exponential backoff (200 ms doubling, +-25% jitter, at most 60 s) that honours C(Retry-After).
      - An interrupted body resumes with a C(Range) request when the server supports it.
      - Other HTTP 4xx statuses fail at once.
    type: int
    default: 8
notes:
  - Proxies are taken from the environment (C(https_proxy), C(http_proxy), C(no_proxy)) unless O(use_proxy=false).
  - Redirects are followed, at most 10 and only to C(http://) and C(https://) URLs.
  - C(file://) URLs and absolute paths on the target are read directly.
'''
