"""vm_image_instance (and the instance part of vm_image_info) through
ansible-playbook: a bootable image served on loopback, instances created,
booted from the module's qemu_args, idempotence, check mode, diff, the
image reference, a live QEMU as owner, errors with their kind."""

import io
import os
import subprocess
import time

import pytest

from support.ansible_run import run_playbook
from support.boot_image import (
    BOOT_MACHINE, debug_exit_args, expected_exit_status, make_boot_image_folder, parse_boot_lines,
)
from support.http_server import LocalHTTPServer

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.accelerator import decide_accelerator
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.image_locks import is_in_use


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('img')
    out = io.BytesIO()
    packed = write_image_archive(make_boot_image_folder(str(tmp / 'boot')), out)
    with LocalHTTPServer() as srv:
        yield srv.add('/boot/image.tar.zst', out.getvalue()), packed.digest


def _fetch(store, url, **kw):
    return {'vmimage.qemu.vm_image_fetch': dict(url=url, image_id='boot', store=store, **kw)}


def _instance(store, name, **kw):
    args = dict(name=name, store=store)
    if kw.get('state') != 'absent':
        args['image'] = 'boot'
    args.update(kw)
    return {'vmimage.qemu.vm_image_instance': args}


def _ignoring(task):
    return dict(task, ignore_errors=True)


def _boot(argv, log):
    return subprocess.Popen(argv + debug_exit_args() + ['-serial', 'file:' + log], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_instances_boot_from_qemu_args_and_hold_their_image(tmp_path, served):
    url, digest = served
    store = str(tmp_path / 'store')
    run = run_playbook([
        _fetch(store, url),
        _instance(store, 'a', machine={'memory': 48}),
        _instance(store, 'a', machine={'memory': 48}),
        _instance(store, 'b'),
        dict(_instance(store, 'c'), check_mode=True),
        dict(_instance(store, 'b', mac='02:12:34:56:78:9a'), diff=True),
        {'vmimage.qemu.vm_image_info': {'store': store}},
        _ignoring({'vmimage.qemu.vm_image_fetch': {'image_id': 'boot', 'state': 'absent', 'store': store}}),
        _ignoring(_instance(store, '../etc')),
        _ignoring(_instance(store, 'b', image='sha256:' + '0' * 64)),
        _ignoring(_instance(store, 'd', machine={'memory': 'lots'})),
        _ignoring(_instance(store, 'd', mac=BOOT_MACHINE['mac'])),
    ], tmp_path)
    _fetched, a, a_again, b, c_check, b_mac, info, remove_image, bad_name, unknown, bad_machine, image_mac = run.results

    assert a['changed'] is True and a['action'] == 'create'
    assert a['disk'] == os.path.join(store, 'instances', 'a', 'disk.qcow2') and os.path.isfile(a['disk'])
    assert a['format'] == 'qcow2' and a['image_id'] == 'boot' and a['digest'] == digest
    assert a['machine']['memory'] == 48 and a['machine']['mac'] == a['mac'] and a['uuid']
    assert [(e['filename'], e['format']) for e in a['backing_chain']] == [
        (a['disk'], 'qcow2'),
        (os.path.join(store, 'images', digest[7:], 'layer.qcow2'), 'qcow2'),
        (os.path.join(store, 'images', digest[7:], 'disk.img'), 'raw')]
    assert a['owners'] == []
    decision = decide_accelerator('auto')
    assert a['qemu_args'][a['qemu_args'].index('-accel') + 1] == a['accel'] == decision.accel
    assert a['qemu_args'][a['qemu_args'].index('-cpu') + 1] == decision.cpu
    assert a['accel_reason'] == decision.reason
    assert 'e1000,netdev=net0,mac=%s' % a['mac'] in a['qemu_args']

    assert a_again['changed'] is False and a_again['action'] == 'none'
    assert (a_again['mac'], a_again['uuid']) == (a['mac'], a['uuid'])
    assert b['changed'] is True and b['mac'] not in (a['mac'], BOOT_MACHINE['mac']) and b['uuid'] != a['uuid']

    assert c_check['changed'] is True and c_check['action'] == 'create' and c_check['mac'] is None
    assert not os.path.exists(os.path.join(store, 'instances', 'c'))

    assert b_mac['changed'] is True and b_mac['action'] == 'update' and b_mac['mac'] == '02:12:34:56:78:9a'
    assert b_mac['diff']['before']['mac'] == b['mac'] and b_mac['diff']['after']['mac'] == '02:12:34:56:78:9a'

    assert [(i['name'], i['image'], i['digest'], i['mac'], i['owners']) for i in info['instances']] == [
        ('a', 'boot', digest, a['mac'], []), ('b', 'boot', digest, '02:12:34:56:78:9a', [])]
    assert info['instances'][0]['disk'] == a['disk']
    assert info['images'][0]['instances'] == 2 and info['usage']['instances'] == 2

    assert remove_image['failed'] is True and remove_image['error_kind'] == 'in_use'
    assert 'instance a' in remove_image['msg'] and 'instance b' in remove_image['msg']
    assert bad_name['failed'] is True and bad_name['error_kind'] == 'store'
    assert 'invalid instance name' in bad_name['msg']
    assert unknown['failed'] is True and unknown['error_kind'] == 'not_found'
    assert bad_machine['failed'] is True and bad_machine['error_kind'] == 'invalid_machine'
    assert 'memory' in bad_machine['msg']
    assert image_mac['failed'] is True and image_mac['error_kind'] == 'invalid_machine'
    assert not os.path.exists(os.path.join(store, 'instances', 'd'))

    # Boot both at once from the module's own qemu_args.
    logs = [str(tmp_path / 'a.log'), str(tmp_path / 'b.log')]
    procs = [_boot(a['qemu_args'], logs[0]), _boot(b_mac['qemu_args'], logs[1])]
    for proc, log in zip(procs, logs):
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == expected_exit_status(), err.decode('utf-8', 'replace')
        assert parse_boot_lines(open(log).read()) == [1]

    run = run_playbook([
        _instance(store, 'a', state='absent'),
        _instance(store, 'a', state='absent'),
        dict(_instance(store, 'b', state='absent'), check_mode=True),
        _instance(store, 'b', state='absent'),
        {'vmimage.qemu.vm_image_fetch': {'image_id': 'boot', 'state': 'absent', 'store': store}},
    ], tmp_path)
    gone, again, b_check, b_gone, image_gone = run.results
    assert gone['changed'] is True and gone['action'] == 'remove' and gone['digest'] == digest
    assert again['changed'] is False
    assert b_check['changed'] is True and b_gone['changed'] is True
    assert image_gone['changed'] is True and image_gone['removed_digest'] == digest
    assert os.listdir(os.path.join(store, 'instances')) == []


def test_running_vm_owns_its_disk_until_forced(tmp_path, served):
    url, digest = served
    store = str(tmp_path / 'store')
    created = run_playbook([_fetch(store, url), _instance(store, 'vm')], tmp_path)[1]
    # Paused (-S): QEMU has opened and locked the disk; the guest never runs.
    proc = subprocess.Popen(created['qemu_args'] + ['-S', '-monitor', 'stdio'], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not is_in_use(created['disk']):
            assert proc.poll() is None and time.monotonic() < deadline, 'QEMU did not lock the disk'
            time.sleep(0.05)
        run = run_playbook([
            {'vmimage.qemu.vm_image_info': {'store': store, 'image': 'boot'}},
            _ignoring(_instance(store, 'vm', state='absent')),
            _instance(store, 'vm'),
            _instance(store, 'vm', state='absent', force=True),
        ], tmp_path, diff=True)
        info, refused, present, forced = run.results
        owner = info['instances'][0]['owners']
        assert [(o['pid'], o['command'], o['writable']) for o in owner] == \
            [(proc.pid, 'qemu-system-x86_64', True)]
        assert owner[0]['locks'], 'QEMU holds its image lock on the disk'
        assert refused['failed'] is True and refused['error_kind'] == 'in_use'
        assert 'pid %d (qemu-system-x86_64' % proc.pid in refused['msg'] and 'set force' in refused['msg']
        # The holders come back as data too, as vm_image_package returns them.
        assert refused['holders'] == owner
        assert present['changed'] is False and present['owners'] == owner
        assert forced['changed'] is True and forced['owners'] == owner
        assert forced['diff']['before']['name'] == 'vm' and forced['diff']['after'] == {}
        assert not os.path.exists(created['disk'])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_check_mode_without_store_reports_missing_image(tmp_path):
    store = str(tmp_path / 'nothing')
    run = run_playbook([_ignoring(dict(_instance(store, 'a'), check_mode=True)),
                        _instance(store, 'a', state='absent'),
                        {'vmimage.qemu.vm_image_info': {'store': store}}], tmp_path)
    assert run[0]['failed'] is True and run[0]['error_kind'] == 'not_found'
    assert run[1]['changed'] is False
    assert run[2]['instances'] == [] and run[2]['usage']['instances'] == 0
    assert not os.path.exists(store)


def test_accel_option_is_used_as_given(tmp_path, served):
    url, _digest = served
    store = str(tmp_path / 'store')
    run = run_playbook([
        _fetch(store, url),
        _instance(store, 't', accel='tcg'),
        _instance(store, 'k', accel='kvm'),
        _ignoring(_instance(store, 'x', accel='hvf')),
        {'vmimage.qemu.vm_host_info': {}},
        _instance(store, 'auto'),
    ], tmp_path)
    _fetched, tcg, kvm, bad, host, auto = run.results
    assert (tcg['accel'], tcg['accel_reason']) == ('tcg', 'requested')
    assert tcg['qemu_args'][tcg['qemu_args'].index('-cpu') + 1] == 'max'
    assert (kvm['accel'], kvm['accel_reason']) == ('kvm', 'requested')
    assert kvm['qemu_args'][kvm['qemu_args'].index('-cpu') + 1] == 'host'
    assert bad['failed'] is True and 'accel' in bad['msg'] and 'hvf' in bad['msg']
    # The host facts and the instances make one decision.
    assert auto['accel'] == host['accelerator']
    assert auto['accel_reason'] == (host['kvm']['reason'] if auto['accel'] == 'tcg' else auto['accel_reason'])
