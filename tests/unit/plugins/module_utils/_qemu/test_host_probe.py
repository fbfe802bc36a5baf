# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host probe against real parts: the real /dev/kvm (with QEMU itself as
the referee), device nodes made with mknod and opened by an unprivileged
user, real executables for the version probes, real imports."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu import host_probe
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.host_probe import (
    KVM_API_VERSION, api_version_reason, binary_version, describe_permission_denied, library_version,
    parse_version, probe_kvm, python_libraries, qemu_versions,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.accelerator import decide_accelerator
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.host_facts import probe_host

QEMU = shutil.which('qemu-system-x86_64')
HAS_KVM_DEVICE = os.path.exists(host_probe.KVM_DEVICE)
IS_ROOT = os.geteuid() == 0
# The unprivileged child runs the probe file itself under the system Python:
# the test interpreter may live under a folder 'nobody' cannot enter.
SYSTEM_PYTHON = '/usr/bin/python3' if os.access('/usr/bin/python3', os.X_OK) else None
PROBE_FILE = os.path.abspath(host_probe.__file__)

try:
    NOBODY = pwd.getpwnam('nobody')
except KeyError:
    NOBODY = None

needs_root = pytest.mark.skipif(not IS_ROOT or NOBODY is None or SYSTEM_PYTHON is None,
                                reason='needs root, a nobody user and /usr/bin/python3 to drop privileges')

_CHILD = r'''
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location('host_probe', sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print(json.dumps(mod.probe_kvm(sys.argv[2]).as_dict()))
'''


def _drop_to(uid, gid, groups):
    def preexec():
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    return preexec


def probe_as(uid, gid, groups, device):
    """probe_kvm(device) in a child process running as uid/gid/groups."""
    proc = subprocess.run([SYSTEM_PYTHON, '-c', _CHILD, PROBE_FILE, device], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60, check=False,
                          preexec_fn=_drop_to(uid, gid, groups), cwd='/')
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def qemu_accepts_kvm(preexec_fn=None):
    """QEMU itself as the referee: does ``-accel kvm`` initialise?"""
    proc = subprocess.run([QEMU, '-machine', 'none', '-accel', 'kvm', '-nodefaults', '-no-user-config',
                           '-display', 'none', '-monitor', 'stdio'],
                          input='quit\n', stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=60, check=False, preexec_fn=preexec_fn, cwd='/')
    return proc.returncode == 0, proc.stderr


@pytest.fixture
def open_dir():
    """A folder every user can traverse (pytest's tmp_path is root-only)."""
    path = tempfile.mkdtemp(prefix='vmimage-probe-')
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def _kvm_node(folder, mode, gid):
    """A second device node for the real KVM character device."""
    real = os.stat(host_probe.KVM_DEVICE)
    path = os.path.join(folder, 'kvm')
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, real.st_rdev)
    except OSError as exc:
        pytest.skip('cannot create device nodes here: %s' % exc)
    os.chown(path, 0, gid)
    os.chmod(path, mode)
    return path


def _spare_group():
    """A group nobody is not in by default."""
    for name in ('disk', 'adm', 'daemon', 'sys'):
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:
            continue
        if gid != NOBODY.pw_gid:
            return name, gid
    pytest.skip('no spare system group')


# ---------------------------------------------------------------- real /dev/kvm

@pytest.mark.skipif(not HAS_KVM_DEVICE or QEMU is None, reason='no /dev/kvm or no qemu-system-x86_64')
def test_real_device_agrees_with_qemu():
    status = probe_kvm()
    accepted, stderr = qemu_accepts_kvm()
    assert status.usable == accepted, (status, stderr)
    assert status.device == '/dev/kvm'
    if status.usable:
        assert status.reason == 'ok' and status.api_version == KVM_API_VERSION
    else:
        assert status.reason != 'ok' and '/dev/kvm' in status.reason
    if not status.usable:
        assert decide_accelerator('auto').reason == status.reason, 'the decision starts from this probe'


@needs_root
@pytest.mark.skipif(not HAS_KVM_DEVICE or QEMU is None, reason='no /dev/kvm or no qemu-system-x86_64')
def test_real_device_as_nobody_agrees_with_qemu():
    result = probe_as(NOBODY.pw_uid, NOBODY.pw_gid, [], '/dev/kvm')
    accepted, stderr = qemu_accepts_kvm(_drop_to(NOBODY.pw_uid, NOBODY.pw_gid, []))
    assert result['usable'] == accepted, (result, stderr)
    if not result['usable']:
        st = os.stat('/dev/kvm')
        assert 'permission denied' in result['reason'] and 'mode %04o' % stat.S_IMODE(st.st_mode) in result['reason']
        assert 'Permission denied' in stderr


# ---------------------------------------------------------------- permissions

@needs_root
@pytest.mark.skipif(not HAS_KVM_DEVICE, reason='no /dev/kvm to make a node for')
def test_permission_denied_names_group_mode_and_membership(open_dir):
    name, gid = _spare_group()
    node = _kvm_node(open_dir, 0o660, gid)
    result = probe_as(NOBODY.pw_uid, NOBODY.pw_gid, [], node)
    assert result == dict(usable=False, device=node, api_version=None, reason=result['reason'])
    reason = result['reason']
    assert reason.startswith('permission denied opening %s read-write' % node)
    assert '(owner root, group %s, mode 0660)' % name in reason
    assert 'user nobody' in reason and 'is not in group %s' % name in reason

    # The same node, with the group among nobody's groups: the kernel lets it in.
    member = probe_as(NOBODY.pw_uid, NOBODY.pw_gid, [gid], node)
    if probe_kvm().usable:
        assert member == dict(usable=True, reason='ok', device=node, api_version=KVM_API_VERSION)
    else:
        assert 'permission denied' not in member['reason']


@needs_root
@pytest.mark.skipif(not HAS_KVM_DEVICE, reason='no /dev/kvm to make a node for')
def test_member_of_group_without_group_access(open_dir):
    name, gid = _spare_group()
    node = _kvm_node(open_dir, 0o600, gid)
    result = probe_as(NOBODY.pw_uid, NOBODY.pw_gid, [gid], node)
    assert not result['usable']
    assert 'mode 0600' in result['reason']
    assert 'is in group %s but the group has no read-write access' % name in result['reason']


def test_permission_reasons_for_each_relation(tmp_path):
    path = str(tmp_path / 'dev')
    with open(path, 'w'):
        pass
    os.chmod(path, 0o660)
    st = os.stat(path)
    other_uid = st.st_uid + 12345
    other_gid = st.st_gid + 12345
    assert describe_permission_denied(path, st, uid=other_uid, groups={other_gid}).endswith(
        'is not in group %s; add the user to that group (takes effect at the next login)' % grp.getgrgid(st.st_gid).gr_name)
    assert 'mode allows read-write' in describe_permission_denied(path, st, uid=other_uid, groups={st.st_gid})
    assert 'root is refused' in describe_permission_denied(path, st, uid=0, groups={0})
    os.chmod(path, 0o666)
    assert 'to everyone' in describe_permission_denied(path, os.stat(path), uid=other_uid, groups={other_gid})
    os.chmod(path, 0o400)
    st = os.stat(path)
    if st.st_uid != 0:
        assert 'owner has no read-write' in describe_permission_denied(path, st, uid=st.st_uid, groups=set())


@needs_root
def test_unreadable_plain_file_is_permission_denied(open_dir):
    path = os.path.join(open_dir, 'kvm')
    with open(path, 'w'):
        pass
    os.chmod(path, 0o600)
    result = probe_as(NOBODY.pw_uid, NOBODY.pw_gid, [], path)
    assert not result['usable'] and result['reason'].startswith('permission denied opening %s' % path)
    assert 'is not in group root, and that group has no read-write access either' in result['reason']


# ---------------------------------------------------------------- other failures

def test_missing_device(tmp_path):
    device = str(tmp_path / 'no-such-kvm')
    status = probe_kvm(device)
    assert not status.usable and status.api_version is None and status.device == device
    assert status.reason.startswith('%s does not exist' % device)
    assert 'kvm kernel module' in status.reason
    assert decide_accelerator('auto', kvm_device=device).accel == 'tcg'


@pytest.mark.parametrize('kind', ['null', 'file'])
def test_device_that_is_not_kvm(tmp_path, kind):
    if kind == 'null':
        device = '/dev/null'
    else:
        device = str(tmp_path / 'plain')
        with open(device, 'wb') as f:
            f.write(b'x')
    status = probe_kvm(device)
    assert not status.usable and status.api_version is None
    assert status.reason.startswith('ioctl KVM_GET_API_VERSION on %s failed' % device)
    assert '(ENOTTY)' in status.reason or '(EINVAL)' in status.reason
    assert status.reason.endswith('not a KVM device')


def test_directory_cannot_be_opened_read_write(tmp_path):
    status = probe_kvm(str(tmp_path))
    assert not status.usable and 'cannot open %s read-write' % tmp_path in status.reason
    assert '(EISDIR)' in status.reason


def test_api_version_check():
    assert api_version_reason('/dev/kvm', 12) is None
    reason = api_version_reason('/dev/kvm', 11)
    assert reason == 'KVM_GET_API_VERSION on /dev/kvm returned 11, expected 12: unsupported kernel KVM API'


# ---------------------------------------------------------------- QEMU versions

def _script(folder, name, body):
    path = os.path.join(str(folder), name)
    with open(path, 'w') as f:
        f.write('#!/bin/sh\n' + body + '\n')
    os.chmod(path, 0o755)
    return path


def test_parse_version():
    assert parse_version('QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n') == '7.2.22'
    assert parse_version('qemu-img version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)\nCopyright') == '8.2.2'
    assert parse_version('no digits here') is None
    assert parse_version('') is None


@pytest.mark.skipif(QEMU is None or shutil.which('qemu-img') is None, reason='QEMU not installed')
def test_installed_qemu_versions():
    found = qemu_versions()
    assert found['system_binary'] == QEMU and found['img_binary'] == shutil.which('qemu-img')
    assert found['system_version'] and found['system_version'].split('.')[0].isdigit()
    # Both come from the same QEMU source release on Debian and Ubuntu.
    assert found['system_version'] == found['img_version']
    banner = subprocess.run([QEMU, '--version'], stdout=subprocess.PIPE, universal_newlines=True,
                            check=True).stdout
    assert ('version %s' % found['system_version']) in banner


def test_missing_broken_and_slow_binaries(tmp_path):
    assert qemu_versions(path=str(tmp_path)) == dict(system_binary=None, system_version=None,
                                                     img_binary=None, img_version=None)
    _script(tmp_path, 'qemu-system-x86_64', 'echo "QEMU emulator version 9.1.0"; exit 1')
    img = _script(tmp_path, 'qemu-img', 'exec sleep 30')
    found = qemu_versions(path=str(tmp_path), timeout=0.5)
    assert found['system_binary'] == str(tmp_path / 'qemu-system-x86_64') and found['system_version'] is None
    assert found['img_binary'] == img and found['img_version'] is None
    good = _script(tmp_path, 'qemu-img', 'echo "qemu-img version 9.1.0 (test)"')
    assert binary_version(good) == '9.1.0'
    assert binary_version(str(tmp_path / 'missing')) is None
    assert binary_version(None) is None


# ---------------------------------------------------------------- Python libraries

def test_python_libraries(tmp_path, monkeypatch):
    import zstandard
    import requests
    libs = python_libraries()
    assert libs['zstandard'] == zstandard.__version__ and libs['requests'] == requests.__version__
    assert libs['executable'] == sys.executable and libs['version'].startswith('%d.%d.' % sys.version_info[:2])
    assert library_version('vmimage_no_such_library') is None
    (tmp_path / 'vmimage_broken_lib.py').write_text('raise RuntimeError("half installed")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert library_version('vmimage_broken_lib') is None


def test_probe_host_shape(tmp_path):
    report = probe_host(kvm_device=str(tmp_path / 'none'))
    assert report['accelerator'] == 'tcg' and report['kvm']['usable'] is False
    assert set(report['qemu']) == {'system_binary', 'system_version', 'img_binary', 'img_version'}
    assert set(report['python']) == {'version', 'executable', 'zstandard', 'requests'}
    real = probe_host()
    assert real['accelerator'] == ('kvm' if real['kvm']['usable'] else 'tcg')
    assert real['kvm']['usable'] is False or real['kvm']['device_usable'] is True
