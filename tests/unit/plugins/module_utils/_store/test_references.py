# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The store's reference records: one file per reference, idempotent
changes, last use, verification against what really exists."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import time

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import StoreError
from ansible_collections.vmimage.qemu.plugins.module_utils._store.references import Reference, References, iso_time

A = 'sha256:' + 'a' * 64
B = 'sha256:' + 'b' * 64


def test_references_are_added_and_removed_idempotently(tmp_path):
    refs = References(str(tmp_path / 'refs'))
    assert refs.of(A) == [] and refs.digests() == []
    assert refs.add(A, 'instance', 'ci-2') is True
    assert refs.add(A, 'instance', 'ci-2') is False
    refs.add(A, 'alias', 'builder')
    refs.add(A, 'instance', 'ci-1')
    refs.add(B, 'child', A)
    assert refs.of(A) == [Reference('alias', 'builder'), Reference('instance', 'ci-1'), Reference('instance', 'ci-2')]
    assert [r.describe() for r in refs.of(B)] == ['child image ' + A]
    assert refs.digests() == [A, B]
    assert refs.remove(A, 'instance', 'ci-1') is True and refs.remove(A, 'instance', 'ci-1') is False
    assert refs.of(A) == [Reference('alias', 'builder'), Reference('instance', 'ci-2')]
    refs.forget(A)
    assert refs.of(A) == [] and refs.digests() == [B]


def test_names_are_derived_never_taken_from_keys(tmp_path):
    refs = References(str(tmp_path / 'refs'))
    refs.add(A, 'alias', '../../etc/passwd')
    (name,) = os.listdir(os.path.join(str(tmp_path / 'refs'), 'a' * 64))
    assert name.startswith('alias-') and len(name) == len('alias-') + 64 + len('.json')
    assert refs.of(A) == [Reference('alias', '../../etc/passwd')]
    with pytest.raises(StoreError, match='unknown reference kind'):
        refs.add(A, 'friend', 'x')
    with pytest.raises(StoreError, match='not a sha256 digest'):
        refs.add('sha256:../x', 'alias', 'x')


def test_last_use_is_the_mtime_of_one_file(tmp_path):
    refs = References(str(tmp_path / 'refs'))
    assert refs.last_used(A) is None
    refs.touch(A, when=1000000000)
    assert refs.last_used(A) == 1000000000 and iso_time(refs.last_used(A)) == '2001-09-09T01:46:40Z'
    before = time.time()
    refs.touch(A)
    assert refs.last_used(A) >= before - 1
    assert refs.of(A) == [], 'the last-use file is not a reference'


def test_verify_drops_references_whose_holder_is_gone(tmp_path):
    refs = References(str(tmp_path / 'refs'))
    refs.add(A, 'instance', 'alive')
    refs.add(A, 'instance', 'gone')
    dropped = refs.verify(lambda digest, ref: ref.key != 'gone')
    assert dropped == [(A, Reference('instance', 'gone'))]
    assert refs.of(A) == [Reference('instance', 'alive')]
