# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Bringing a store written by an earlier release up to the current format.

Format 1 (release 0.1.0) had no ``store.json`` and no reference records: who
used an image was found by scanning every instance folder.  Format 2 adds
``refs/``.  The upgrade runs on the first open by a writer, under the store
lock, and is idempotent and crash-safe: it only adds reference records
(adding one twice is a no-op), carries each image's ``last_used`` over,
collects what killed 0.1.0 processes left, and writes ``store.json`` last --
a crash before that point means the next writer simply runs it again.
A fresh store just gets its ``store.json``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import time

from ansible_collections.vmimage.qemu.plugins.module_utils._core.fs import read_json
from ansible_collections.vmimage.qemu.plugins.module_utils._core.layout import INSTANCE_RECORD
from ansible_collections.vmimage.qemu.plugins.module_utils._core.locks import try_lock
from ansible_collections.vmimage.qemu.plugins.module_utils._core.staging import remove_tree
from ansible_collections.vmimage.qemu.plugins.module_utils._store.references import posix_time

# 0.1.0 built and removed instances in instances/.new-*/ and .old-*/ folders
# holding their owner's flock in a ``.lock`` file inside.
_LEGACY_INSTANCE_WORK = ('.new-', '.old-')
_LEGACY_WORK_LOCK = '.lock'


def _collect_legacy_instance_work(instances_dir):
    removed = []
    try:
        names = sorted(os.listdir(instances_dir))
    except OSError:
        return removed
    for name in names:
        if not name.startswith(_LEGACY_INSTANCE_WORK):
            continue
        path = os.path.join(instances_dir, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            held = try_lock(os.path.join(path, _LEGACY_WORK_LOCK))
        except OSError:
            continue
        if held is None:
            continue  # a 0.1.0 process is still at work
        try:
            remove_tree(path)
            removed.append(name)
        finally:
            held.release()
    return removed


def upgrade_store(store, fresh=False):
    """Bring ``store`` (an ImageStore whose folders exist) to the current format."""
    with store.lock():
        if store.format() >= 2:
            return False  # another process did it while we waited
        if not fresh:
            for alias, entry in sorted(store.aliases().items()):
                if store.get_record(entry['digest']) is not None:
                    store.refs.add(entry['digest'], 'alias', alias)
            for name in sorted(os.listdir(store.instances_dir)):
                if name.startswith('.'):
                    continue
                record = read_json(os.path.join(store.instances_dir, name, INSTANCE_RECORD))
                if isinstance(record, dict) and record.get('name') == name and \
                        isinstance(record.get('digest'), str) and store.get_record(record['digest']) is not None:
                    store.refs.add(record['digest'], 'instance', name)
            for record in store.iter_records():
                if store.refs.last_used(record['digest']) is None:
                    store.refs.touch(record['digest'], posix_time(record.get('last_used')) or time.time())
            store.collect()
            _collect_legacy_instance_work(store.instances_dir)
        store.write_format()
        return True
