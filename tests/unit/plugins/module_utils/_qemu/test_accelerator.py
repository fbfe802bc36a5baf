# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The accelerator decision: the real QEMU on this host as the referee, and
stand-in QEMU binaries for the hosts this one is not (one that aborts like
QEMU does where KVM is broken, one that hangs, one without KVM enabled):
such a host cannot be made on demand, and the decision must be right there."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu import accelerator
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.accelerator import (
    AccelDecision, cache_key, decide_accelerator, trial_argv,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.host_facts import probe_host
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.host_probe import probe_kvm
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.command_line import build_qemu_args

QEMU = shutil.which('qemu-system-x86_64')
DEVICE_OK = probe_kvm().usable
needs_device = pytest.mark.skipif(not DEVICE_OK, reason='/dev/kvm is not usable here: %s' % probe_kvm().reason)
MAC = '52:54:00:12:34:56'
DISK = '/var/lib/vm-images/instances/a/disk.qcow2'

_FAKE = '''#!%(python)s
import json, os, signal, sys, time
with open(%(log)r, 'a') as log:
    log.write(json.dumps(sys.argv[1:]) + '\\n')
behaviour = %(behaviour)r
if behaviour == 'abort':
    sys.stderr.write('qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\\n')
    sys.stderr.write("qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: "
                     "Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGABRT)
if behaviour == 'hang':
    time.sleep(60)
enabled = behaviour == 'ok'
print(json.dumps({"QMP": {"version": {}, "capabilities": []}}))
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd['execute'] == 'query-kvm':
        print(json.dumps({"return": {"enabled": enabled, "present": True}, "id": cmd.get('id')}))
    elif cmd['execute'] == 'quit':
        print(json.dumps({"return": {}}))
        sys.exit(0)
    else:
        print(json.dumps({"return": {}}))
'''


class FakeQemu(object):
    """A stand-in qemu-system-x86_64 that records each start."""

    def __init__(self, folder, behaviour):
        self.log = str(folder / ('starts-%s.log' % behaviour))
        self.path = str(folder / ('qemu-%s' % behaviour))
        with open(self.path, 'w') as f:
            f.write(_FAKE % dict(python=sys.executable, log=self.log, behaviour=behaviour))
        os.chmod(self.path, 0o755)

    @property
    def starts(self):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [json.loads(line) for line in f]


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / 'cache'
    return str(path)


# ---------------------------------------------------------------- the real QEMU

@pytest.mark.skipif(QEMU is None, reason='qemu-system-x86_64 not installed')
def test_auto_agrees_with_qemu_started_as_the_instance_would_be(cache):
    """The referee: QEMU with the instance's machine type and CPU, run
    independently of the probe, under a human monitor."""
    decision = decide_accelerator('auto', cache_dir=cache)
    if not DEVICE_OK:
        assert decision.accel == 'tcg' and decision.reason == probe_kvm().reason
        return
    proc = subprocess.run([QEMU, '-machine', 'pc-i440fx-2.8', '-accel', 'kvm', '-cpu', 'host', '-nodefaults',
                           '-no-user-config', '-display', 'none', '-S', '-monitor', 'stdio'],
                          input='info kvm\nquit\n', stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60, check=False, cwd='/')
    works = proc.returncode == 0 and 'kvm support: enabled' in proc.stdout
    assert (decision.accel == 'kvm') is works, (decision, proc.stderr)
    if works:
        assert decision.cpu == 'host' and decision.qemu_error is None
    else:
        assert decision.cpu == 'max' and decision.fell_back
        first = proc.stderr.strip().splitlines()[0]
        assert first in decision.reason and first in decision.qemu_error
    again = decide_accelerator('auto', cache_dir=cache)
    assert again.cached and (again.accel, again.cpu, again.reason) == (decision.accel, decision.cpu, decision.reason)


@pytest.mark.skipif(QEMU is None, reason='qemu-system-x86_64 not installed')
def test_host_report_is_the_instances_decision(cache):
    report = probe_host(cache_dir=cache)
    decision = decide_accelerator('auto', cache_dir=cache)
    assert report['accelerator'] == decision.accel and report['cpu'] == decision.cpu
    assert report['kvm']['usable'] is (decision.accel == 'kvm')
    assert report['kvm']['device_usable'] is DEVICE_OK
    assert report['kvm']['qemu_error'] == decision.qemu_error
    argv = build_qemu_args({'version': 1}, DISK, mac=MAC)
    assert argv[argv.index('-accel') + 1] == report['accelerator']
    assert argv[argv.index('-cpu') + 1] == report['cpu']


def test_host_report_without_a_device(tmp_path):
    report = probe_host(kvm_device=str(tmp_path / 'none'), cache_dir=None)
    assert report['accelerator'] == 'tcg' and report['cpu'] == 'max'
    assert report['kvm']['usable'] is False and report['kvm']['device_usable'] is False
    assert report['kvm']['reason'].startswith('%s does not exist' % (tmp_path / 'none'))


# ---------------------------------------------------------------- stand-ins

@needs_device
def test_qemu_that_aborts_with_kvm_falls_back_to_tcg_with_its_words(tmp_path, cache):
    fake = FakeQemu(tmp_path, 'abort')
    decision = decide_accelerator('auto', binary=fake.path, cache_dir=cache)
    assert (decision.accel, decision.cpu, decision.requested) == ('tcg', 'max', 'auto') and decision.fell_back
    assert 'killed by signal 6' in decision.reason and 'failed to set MSR 0x10a' in decision.reason
    assert 'kvm_buf_set_msrs: Assertion' in decision.qemu_error
    assert fake.starts == [trial_argv(fake.path, 'pc-i440fx-2.8', 'host')[1:]], \
        'the trial carries the machine type, accelerator and CPU of the command line, paused'
    assert '-S' in fake.starts[0] and '-nodefaults' in fake.starts[0]
    argv = build_qemu_args({'version': 1}, DISK, mac=MAC, binary=fake.path)
    assert argv[argv.index('-accel') + 1] == 'tcg' and argv[argv.index('-cpu') + 1] == 'max'


@needs_device
def test_qemu_that_answers_with_kvm_enabled_gets_kvm(tmp_path, cache):
    fake = FakeQemu(tmp_path, 'ok')
    decision = decide_accelerator('auto', binary=fake.path, cache_dir=cache)
    assert (decision.accel, decision.cpu) == ('kvm', 'host') and not decision.fell_back
    assert decision.reason.startswith('ok: ') and decision.qemu_error is None
    assert decision.kvm['usable'] is True and decision.kvm['api_version'] == 12


@needs_device
def test_qemu_without_kvm_enabled_is_not_kvm(tmp_path, cache):
    fake = FakeQemu(tmp_path, 'disabled')
    decision = decide_accelerator('auto', binary=fake.path, cache_dir=cache)
    assert decision.accel == 'tcg' and 'without KVM enabled' in decision.reason


@needs_device
def test_a_hanging_trial_is_bounded_and_not_cached(tmp_path, cache):
    fake = FakeQemu(tmp_path, 'hang')
    first = decide_accelerator('auto', binary=fake.path, cache_dir=cache, timeout=1)
    assert first.accel == 'tcg' and 'did not answer within 1 s' in first.reason
    second = decide_accelerator('auto', binary=fake.path, cache_dir=cache, timeout=1)
    assert not second.cached and len(fake.starts) == 2, 'a timeout says nothing about the host'


def test_explicit_choices_start_nothing(tmp_path, cache):
    fake = FakeQemu(tmp_path, 'abort')
    kvm = decide_accelerator('kvm', binary=fake.path, cache_dir=cache, kvm_device=str(tmp_path / 'none'))
    tcg = decide_accelerator('tcg', binary=fake.path, cache_dir=cache)
    assert (kvm.accel, kvm.cpu, kvm.reason) == ('kvm', 'host', 'requested')
    assert (tcg.accel, tcg.cpu, tcg.reason) == ('tcg', 'max', 'requested') and not tcg.fell_back
    assert decide_accelerator('tcg', cpu='qemu64').cpu == 'qemu64', 'only host needs replacing under TCG'
    assert fake.starts == []
    with pytest.raises(ValueError, match='accel must be one of auto, kvm, tcg'):
        decide_accelerator('hvf')


def test_unusable_device_starts_nothing(tmp_path, cache):
    fake = FakeQemu(tmp_path, 'ok')
    decision = decide_accelerator('auto', binary=fake.path, cache_dir=cache, kvm_device='/dev/null')
    assert decision.accel == 'tcg' and 'KVM_GET_API_VERSION' in decision.reason
    assert fake.starts == [] and not os.path.exists(cache)


@needs_device
def test_missing_binary_is_said():
    decision = decide_accelerator('auto', binary='vmimage-no-such-qemu', cache_dir=None)
    assert decision.accel == 'tcg' and 'vmimage-no-such-qemu not found' in decision.reason


# ---------------------------------------------------------------- the cache

@needs_device
def test_verdict_is_cached_and_renewed_when_qemu_changes(tmp_path, cache):
    fake = FakeQemu(tmp_path, 'ok')
    assert not decide_accelerator('auto', binary=fake.path, cache_dir=cache).cached
    second = decide_accelerator('auto', binary=fake.path, cache_dir=cache)
    assert second.cached and second.accel == 'kvm' and len(fake.starts) == 1
    entries = os.listdir(cache)
    assert len(entries) == 1 and stat.S_IMODE(os.stat(os.path.join(cache, entries[0])).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700

    # An upgrade replaces the binary: a new verdict.
    with open(fake.path, 'a') as f:
        f.write('# upgraded\n')
    assert not decide_accelerator('auto', binary=fake.path, cache_dir=cache).cached
    assert len(fake.starts) == 2
    # Another CPU model is another question.
    assert not decide_accelerator('auto', cpu='qemu64', binary=fake.path, cache_dir=cache).cached
    assert fake.starts[-1][fake.starts[-1].index('-cpu') + 1] == 'qemu64'


@needs_device
def test_key_covers_the_boot_the_kernel_the_device_and_the_user(tmp_path, monkeypatch):
    fake = FakeQemu(tmp_path, 'ok')
    key = cache_key(fake.path, 'pc-i440fx-2.8', 'host', '/dev/kvm')
    with open('/proc/sys/kernel/random/boot_id') as f:
        assert key['boot_id'] == f.read().strip()
    assert key['kernel'][0] == os.uname().release
    assert key['kvm_device'][1] == os.stat('/dev/kvm').st_rdev
    assert key['user'][0] == os.geteuid()
    monkeypatch.setattr(accelerator, '_BOOT_ID', str(tmp_path / 'no-boot-id'))
    assert cache_key(fake.path, 'pc-i440fx-2.8', 'host', '/dev/kvm') is None, 'no boot id, no cache'


@needs_device
@pytest.mark.parametrize('damage', ['garbage', 'other-key', 'wrong-types'])
def test_a_damaged_or_foreign_entry_is_probed_again(tmp_path, cache, damage):
    fake = FakeQemu(tmp_path, 'abort')
    decide_accelerator('auto', binary=fake.path, cache_dir=cache)
    path = os.path.join(cache, os.listdir(cache)[0])
    with open(path) as f:
        entry = json.load(f)
    if damage == 'garbage':
        text = '{"usable": tr'
    elif damage == 'other-key':
        entry['key']['boot_id'] = 'another boot'
        entry['usable'] = True
        text = json.dumps(entry)
    else:
        entry['usable'] = 'yes'
        text = json.dumps(entry)
    with open(path, 'w') as f:
        f.write(text)
    decision = decide_accelerator('auto', binary=fake.path, cache_dir=cache)
    assert decision.accel == 'tcg' and not decision.cached and len(fake.starts) == 2


@needs_device
def test_a_cache_folder_others_can_write_is_not_used(tmp_path):
    fake = FakeQemu(tmp_path, 'ok')
    shared = tmp_path / 'shared'
    shared.mkdir()
    os.chmod(str(shared), 0o777)
    for _round in range(2):
        assert not decide_accelerator('auto', binary=fake.path, cache_dir=str(shared)).cached
    assert os.listdir(str(shared)) == [] and len(fake.starts) == 2


@needs_device
def test_a_planted_symlink_is_not_followed(tmp_path, cache):
    fake = FakeQemu(tmp_path, 'abort')
    decide_accelerator('auto', binary=fake.path, cache_dir=cache)
    path = os.path.join(cache, os.listdir(cache)[0])
    planted = tmp_path / 'planted.json'
    with open(path) as f:
        entry = json.load(f)
    entry['usable'] = True
    planted.write_text(json.dumps(entry))
    os.unlink(path)
    os.symlink(str(planted), path)
    decision = decide_accelerator('auto', binary=fake.path, cache_dir=cache)
    assert decision.accel == 'tcg' and not decision.cached


def test_default_cache_folder(monkeypatch, tmp_path):
    if os.geteuid() == 0:
        assert accelerator.default_cache_dir() == '/run/vmimage-qemu'
        return
    monkeypatch.setenv('XDG_RUNTIME_DIR', str(tmp_path))
    assert accelerator.default_cache_dir() == str(tmp_path / 'vmimage-qemu')
    monkeypatch.delenv('XDG_RUNTIME_DIR')
    assert accelerator.default_cache_dir() is None


def test_decision_shape():
    decision = AccelDecision('tcg', 'max', 'auto', 'why')
    assert decision.fell_back and decision.as_dict()['reason'] == 'why'
    assert 'why' in repr(decision)
    assert not AccelDecision('tcg', 'max', 'tcg', 'requested').fell_back
