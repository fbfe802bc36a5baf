# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Mutable images survive SIGKILL: a pack, a blank create, a create from an
archive and a disposal killed in the middle leave nothing half visible, and
the next run of the library removes whatever they left and succeeds.  Debris
of earlier versions (lockless names) is removed only when clearly theirs and
long dead; the user's files beside it stay.  The folder lock's timeout is a
LockTimeoutError."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import fcntl
import os
import shutil
import time

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import LockTimeoutError, NotFoundError
from ansible_collections.vmimage.qemu.plugins.module_utils._mutable import mutable_image as mi
from ansible_collections.vmimage.qemu.plugins.module_utils._mutable.mutable_image import MutableImage

from support.image_factory import make_image_folder, pattern
from support.mutable_crash import kill_mid

pytestmark = pytest.mark.skipif(not shutil.which('qemu-img'), reason='needs qemu-img')

MIB = 1024 * 1024


def listing(folder):
    return sorted(os.listdir(str(folder)))


@pytest.fixture
def work(tmp_path):
    """Where the child's script and marker live, away from the folders checked."""
    folder = tmp_path / 'work'
    folder.mkdir()
    return str(folder)


@pytest.fixture
def space(tmp_path):
    """The user's folder the images and archives live in, with a file of theirs."""
    folder = tmp_path / 'space'
    folder.mkdir()
    (folder / 'notes.txt').write_text('mine')
    return folder


def _image(space):
    img = MutableImage.create_blank(str(space / 'img'), 1, {'memory': 256})
    fd = os.open(img.disk, os.O_WRONLY)
    os.pwrite(fd, pattern(8192, 1), 3 * MIB)
    os.close(fd)
    time.sleep(0.05)  # past the timestamp granularity: the fingerprint is trusted
    return img


def _archive(tmp_path):
    folder = make_image_folder(str(tmp_path / 'orig'), disk_size=16 * MIB, chunks=[(MIB, pattern(9000, 2))])
    archive = str(tmp_path / 'orig.tar.zst')
    with open(archive, 'wb') as f:
        write_image_archive(folder, f)
    return archive


def test_sigkill_mid_pack_then_next_pack_cleans_up(space, work):
    img = _image(space)
    dest = str(space / 'img.tar.zst')
    first = img.package(dest)
    with open(img.disk, 'r+b') as f:
        f.seek(5 * MIB)
        f.write(b'changed')
    time.sleep(0.05)
    kill_mid('pack', img.path, dest, work)
    assert len(listing(space)) > 4, 'the killed pack left something to clean up'
    assert mi._read_sidecar(dest)['archive']['digest'] == first.digest, 'dest and sidecar as before'

    again = img.package(dest)
    assert again.changed and again.packed and again.digest != first.digest
    assert listing(space) == ['img', 'img.tar.zst', 'img.tar.zst.vmimage.json', 'notes.txt']
    assert listing(img.path) == ['disk.img', 'machine.json'], 'the half pack\'s layer is gone too'


def test_sigkill_mid_create_blank_then_next_create_cleans_up(space, work):
    path = str(space / 'img')
    kill_mid('create', path, None, work)
    assert not os.path.exists(path), 'a half image is never visible'
    assert len(listing(space)) > 1, 'the killed create left something to clean up'

    img = MutableImage.create_blank(path, 1, {'memory': 256})
    assert listing(space) == ['img', 'notes.txt']
    assert listing(img.path) == ['disk.img', 'machine.json'] and img.inspect().machine['memory'] == 256


def test_sigkill_mid_create_from_archive_then_next_create_cleans_up(space, work, tmp_path):
    archive = _archive(tmp_path)
    path = str(space / 'img')
    kill_mid('from_archive', path, archive, work)
    assert not os.path.exists(path), 'a half image is never visible'
    assert len(listing(space)) > 1, 'the killed extraction left something to clean up'

    img = MutableImage.create_from_archive(path, archive)
    assert listing(space) == ['img', 'notes.txt']
    assert listing(img.path) == ['disk.img', 'machine.json']


def test_sigkill_mid_dispose_then_next_run_cleans_up(space, work):
    img = _image(space)
    kill_mid('dispose', img.path, None, work)
    assert not os.path.exists(img.path), 'the image vanished at once'
    assert len(listing(space)) > 1, 'the killed removal left something to clean up'

    assert MutableImage(img.path).dispose() is False
    assert listing(space) == ['notes.txt']


def test_a_live_work_folder_is_never_collected(space):
    img = _image(space)
    live = img._work_area().new('create')
    try:
        with open(os.path.join(live.path, 'disk.img'), 'wb') as f:
            f.write(b'in progress')
        img.dispose()
        MutableImage.create_blank(img.path, 1)
        assert os.path.exists(os.path.join(live.path, 'disk.img')), 'its owner is alive'
    finally:
        live.discard()
    assert listing(space) == ['img', 'notes.txt']


def _aged(path, age):
    then = time.time() - age
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (then, then), follow_symlinks=False)
    os.utime(path, (then, then))


def _folder(path, names, age):
    os.mkdir(path)
    for name in names:
        with open(os.path.join(path, name), 'wb') as f:
            f.write(b'x')
    _aged(path, age)


def test_debris_of_earlier_versions_is_removed_only_when_clearly_theirs_and_dead(space):
    hour = mi.LEGACY_GRACE
    s = str(space)
    # What earlier versions left, dead for over an hour: removed.
    _folder(os.path.join(s, '.img.tmp-ab3_x9zq'), ['disk.img'], hour + 60)
    _folder(os.path.join(s, '.image-k2j4h5g6'), ['disk.img', 'layer.qcow2', 'machine.json'], hour + 60)
    _folder(os.path.join(s, '.img.removing-0123456789ab'), ['notes-the-user-forced-away.txt'], hour + 60)
    # Written recently (perhaps a live task of an earlier version): kept.
    _folder(os.path.join(s, '.img.tmp-young123'), ['disk.img'], 60)
    _folder(os.path.join(s, '.image-young456'), ['disk.img'], 60)
    # Not what those versions made, however old: the user's, kept.
    _folder(os.path.join(s, '.image-photos01'), ['holiday.jpg'], hour + 60)
    _folder(os.path.join(s, '.img.tmp-notmine-at-all'), ['disk.img'], hour + 60)
    _folder(os.path.join(s, '.other.removing-0123456789ab'), ['disk.img'], hour + 60)
    with open(os.path.join(s, '.image-abcdefgh'), 'w') as f:
        f.write('a file, not a folder')
    _aged(os.path.join(s, '.image-abcdefgh'), hour + 60)
    kept = sorted(['notes.txt', '.img.tmp-young123', '.image-young456', '.image-photos01',
                   '.img.tmp-notmine-at-all', '.other.removing-0123456789ab', '.image-abcdefgh'])
    assert listing(space) == sorted(kept + ['.img.tmp-ab3_x9zq', '.image-k2j4h5g6', '.img.removing-0123456789ab'])

    img = MutableImage.create_blank(str(space / 'img'), 1)
    assert listing(space) == sorted(kept + ['img'])
    img.dispose()
    assert listing(space) == kept


def test_lock_timeout_is_a_lock_timeout_error(space):
    img = _image(space)
    fd = os.open(img.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        busy = MutableImage(img.path, lock_timeout=0.2)
        for action in (lambda: busy.package(str(space / 'x.tar.zst')), busy.dispose):
            with pytest.raises(LockTimeoutError) as info:
                action()
            assert str(info.value).startswith('timed out after 0 s waiting for the lock of mutable image %s'
                                              % img.path)
            assert info.value.kind == 'in_use'
    finally:
        os.close(fd)
    assert listing(space) == ['img', 'notes.txt']


def test_check_mode_and_real_run_share_the_plan(space):
    img = _image(space)
    dest = str(space / 'img.tar.zst')
    plan = img.plan_package(dest)
    assert (plan.action, plan.reason) == ('pack', 'dest does not exist')
    assert listing(space) == ['img', 'notes.txt'], 'planning writes nothing'
    done = img.package(dest)
    assert done.changed and done.reason == plan.reason
    assert img.plan_package(dest).action == 'keep'
    forced = img.plan_package(dest, force=True)
    assert (forced.action, forced.reason) == ('verify', 'force') and forced.result().changed is False
    again = img.package(dest, force=True)
    assert (again.changed, again.packed, again.reason) == (False, True, 'force')

    creation = MutableImage(str(space / 'new')).plan_create(size_gib=2, machine={'memory': 128})
    assert (creation.source, creation.disk_size, creation.machine['memory']) == ('blank', 2 << 30, 128)
    pending = MutableImage(creation.path).plan_package(str(space / 'new.tar.zst'), creation=creation)
    assert (pending.action, pending.reason, pending.result().virtual_size) == ('pack', 'path would be created',
                                                                               2 << 30)
    removal = img.plan_dispose()
    assert removal.remove is True and os.path.isdir(img.path)
    assert MutableImage(str(space / 'none')).plan_dispose().remove is False


def test_plan_create_refuses_what_create_refuses(space):
    missing = str(space / 'missing.tar.zst')
    for attempt in (lambda: MutableImage(str(space / 'new')).plan_create(archive=missing),
                    lambda: MutableImage.create_from_archive(str(space / 'new'), missing)):
        with pytest.raises(NotFoundError, match='cannot read archive .*missing.tar.zst: No such file'):
            attempt()
    with pytest.raises(NotFoundError, match='parent folder'):
        MutableImage(str(space / 'no' / 'new')).plan_create(size_gib=1)
    with pytest.raises(NotFoundError, match='give size_gib'):
        MutableImage(str(space / 'new')).plan_create()
    assert listing(space) == ['notes.txt']
