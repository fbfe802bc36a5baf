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
      - C(Range) and C(If-Range) are managed by the downloader for resuming and cannot be set.
    type: dict
    default: {}
  url_username:
    description:
      - User name for HTTP basic authentication. Overrides user information in the URL.
    type: str
  url_password:
    description:
      - Password for HTTP basic authentication. Never shown in results, errors or logs.
    type: str
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
  - Proxies are taken from the environment (C(https_proxy), C(http_proxy), C(no_proxy)).
  - C(file://) URLs and absolute paths on the target are read directly.
'''
