# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import inspect
import io

from ansible_collections.vmimage.qemu.plugins.module_utils._transfer import download

from ansible_collections.vmimage.qemu.plugins.module_utils._modules import common as module_common
from ansible_collections.vmimage.qemu.plugins.module_utils._transfer import secrets

from ansible_collections.vmimage.qemu.plugins.module_utils._store import store
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import _HashingSink
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import ImageInUseError


def test_default_store_is_the_stores_default():
    assert module_common.DEFAULT_STORE == store.DEFAULT_STORE
    assert module_common.STORE_ARGUMENT_SPEC['store']['default'] == store.DEFAULT_STORE


def test_error_result_carries_kind_and_holders():
    exc = ImageInUseError('disk in use')
    exc.holders = [{'pid': 1, 'command': 'qemu-system-x86_64'}]
    assert module_common.error_result(exc) == dict(msg='disk in use', error_kind='in_use', holders=exc.holders)
    assert module_common.error_result(ValueError('x'))['error_kind'] == 'internal'


class _Trickle(object):
    """A raw file that accepts at most 3 bytes per write."""

    def __init__(self):
        self.buf = io.BytesIO()

    def write(self, data):
        return self.buf.write(bytes(data[:3]))


def test_hashing_sink_survives_short_writes():
    out = _Trickle()
    sink = _HashingSink(out)
    assert sink.write(b'0123456789') == 10
    assert out.buf.getvalue() == b'0123456789' and sink.size == 10


def test_secret_values_reach_what_no_log_cannot():
    params = dict(
        url='https://ci:url%40pw@h/img',
        headers={'Authorization': 'Bearer t1', 'X-Api-Key': 'k1', 'Accept': 'text/plain', 'X-Empty-Token': ''},
        mirrors=['http://m:m%3Apw@m1/img',
                 {'url': 'http://m2/img', 'url_username': 'bob', 'url_password': 'p2', 'headers': {'Cookie': 'c=1'}},
                 {'url': 'http://m3/img', 'passwd': 'typo', 'secret': 's3'},
                 42],
    )
    assert secrets.secret_values(params) == {
        'url%40pw', 'url@pw', 'Bearer t1', 'k1', 'm%3Apw', 'm:pw', 'p2', 'c=1', 's3'}
    # Run before the params are checked: anything malformed is skipped.
    assert secrets.secret_values(dict(headers='x', mirrors='y', url='http://[bad/')) == set()


def test_download_options_carry_every_http_option():
    params = dict((name, spec.get('default')) for name, spec in module_common.HTTP_ARGUMENT_SPEC.items())
    options = module_common.download_options(params)
    assert options['force_basic_auth'] is False and options['use_proxy'] is True and options['use_netrc'] is True
    assert options['http_agent'] is None and options['unredirected_headers'] is None
    accepted = inspect.signature(download.open_download).parameters
    assert set(options) <= set(accepted)
    # Every HTTP option but the two the store passes itself reaches the download.
    assert set(module_common.HTTP_ARGUMENT_SPEC) - set(options) == {'timeout', 'retries'}
