# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import io

from ansible_collections.vmimage.qemu.plugins.module_utils import module_common, store
from ansible_collections.vmimage.qemu.plugins.module_utils.archive_writer import _HashingSink
from ansible_collections.vmimage.qemu.plugins.module_utils.errors import ImageInUseError


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
