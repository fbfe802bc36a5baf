# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The roles vmimage.qemu.hypervisor and vmimage.qemu.image_cache through
ansible-playbook on this host, for real: apt, groups, /dev/kvm, the udev rule,
images served over loopback HTTP into stores under tmp_path.

The plays run the modules with the distribution's /usr/bin/python3, whose
zstandard/requests come from the packages the hypervisor role installs: the
set-up the roles exist for.  The host keeps what the default converge makes
(the packages, group kvm, /dev/kvm root:kvm 0660); what the tests add beyond
that (a user, a group, the udev rule) is removed again.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import grp
import io
import json
import os
import pwd
import stat
import subprocess

import pytest

from support.ansible_run import run_plays
from support.http_server import LocalHTTPServer
from support.image_factory import make_image_folder, pattern

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu import host_probe
from ansible_collections.vmimage.qemu.plugins.module_utils._qemu.host_facts import probe_host
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore

SYSTEM_PYTHON = '/usr/bin/python3'
KVM = '/dev/kvm'
UDEV_RULE = '/etc/udev/rules.d/65-vmimage-kvm.rules'

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason='the roles install packages and manage groups: needs root'),
    pytest.mark.skipif(not os.path.exists('/etc/debian_version') or not os.access(SYSTEM_PYTHON, os.X_OK),
                       reason='the roles target Debian/Ubuntu hosts'),
]


def play(roles=None, tasks=None, gather_facts=False, pre_tasks=None, post_tasks=None, name='Converge'):
    doc = {'name': name, 'hosts': 'localhost', 'connection': 'local', 'gather_facts': gather_facts,
           'vars': {'ansible_python_interpreter': SYSTEM_PYTHON}}
    for key, value in (('pre_tasks', pre_tasks), ('roles', roles), ('tasks', tasks), ('post_tasks', post_tasks)):
        if value:
            doc[key] = value
    return doc


def role(name, **role_vars):
    return {'role': 'vmimage.qemu.' + name, 'vars': role_vars}


def include_role(name, **role_vars):
    return {'name': 'Include ' + name, 'ansible.builtin.include_role': {'name': 'vmimage.qemu.' + name},
            'vars': role_vars}


def expect_failure(*tasks):
    """Tasks in a block whose failure is rescued, so one play can go through
    several failing cases; the rescue records the failure."""
    return {'block': list(tasks),
            'rescue': [{'name': 'Rescued', 'ansible.builtin.debug': {'msg': '{{ ansible_failed_result.msg }}'}}]}


def override_platform(distribution, version, major):
    """Facts as another distribution would report them.  set_fact with
    cacheable writes into the host's fact cache, which is what
    ansible_facts[...] reads: the role sees exactly what gathering on that
    platform would have given it, with no test switch in the role."""
    return {'name': 'Pretend to be %s %s' % (distribution, version), 'ansible.builtin.set_fact': {
        'ansible_distribution': distribution, 'ansible_distribution_version': version,
        'ansible_distribution_major_version': major, 'cacheable': True}}


def image_entry(served, key, **extra):
    entry = {'image_id': key, 'url': served['url'][key], 'checksum': served['digest'][key]}
    entry.update(extra)
    return entry


def report_of(run):
    return run.task('Record what this run did')['ansible_facts']['image_cache_report']


def gets(server, path_part):
    return [r for r in server.requests if r.method == 'GET' and path_part in r.path]


def probe_as_user(user):
    """probe_kvm() in a child running as ``user`` with its groups from /etc/group."""
    entry = pwd.getpwnam(user)

    def drop():
        os.initgroups(user, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)

    child = ('import importlib.util, json, sys\n'
             'spec = importlib.util.spec_from_file_location("host_probe", sys.argv[1])\n'
             'mod = importlib.util.module_from_spec(spec)\n'
             'spec.loader.exec_module(mod)\n'
             'print(json.dumps(mod.probe_kvm().as_dict()))\n')
    proc = subprocess.run([SYSTEM_PYTHON, '-c', child, os.path.abspath(host_probe.__file__)], preexec_fn=drop,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
                          check=False, cwd='/')
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    """Three different small images on a loopback HTTP server."""
    tmp = tmp_path_factory.mktemp('role-images')
    urls, digests = {}, {}
    with LocalHTTPServer() as srv:
        for seed, key in enumerate(('alpha', 'beta', 'gamma'), 1):
            folder = make_image_folder(str(tmp / key), disk_size=4 * 1024 * 1024,
                                       chunks=[(0, pattern(8192, seed)), (3 * 1024 * 1024, pattern(20000, seed + 10))],
                                       machine={'version': 1, 'memory': 256 * seed})
            out = io.BytesIO()
            digests[key] = write_image_archive(folder, out).digest
            urls[key] = srv.add('/%s/image.tar.zst' % key, out.getvalue())
        yield dict(server=srv, url=urls, digest=digests)


@pytest.fixture(scope='module')
def converged(tmp_path_factory, served):
    """Both roles, default hypervisor settings, a store owned root:kvm 0770
    with alpha and beta; run twice."""
    store = str(tmp_path_factory.mktemp('converge') / 'store')
    plays = [play(
        roles=[role('hypervisor', hypervisor_install_packages=True),
               role('image_cache', image_cache_store=store, image_cache_group='kvm', image_cache_mode='0770',
                    image_cache_images=[image_entry(served, 'alpha'), image_entry(served, 'beta')])],
        post_tasks=[
            {'name': 'Probe again', 'vmimage.qemu.vm_host_info': {}, 'register': 'probe'},
            {'name': 'Show the cached facts', 'ansible.builtin.debug': {'msg': {
                'usable': "{{ ansible_facts['vmimage_kvm_usable'] }}",
                'reason': "{{ ansible_facts['vmimage_kvm_reason'] }}",
                'accelerator': "{{ ansible_facts['vmimage_accelerator'] }}",
                'qemu_version': "{{ ansible_facts['vmimage_qemu_version'] }}"}}},
        ])]
    tmp = tmp_path_factory.mktemp('converge-runs')
    served['server'].clear_requests()
    first = run_plays(plays, tmp)
    first_gets = len(gets(served['server'], '/image.tar.zst'))
    served['server'].clear_requests()
    second = run_plays(plays, tmp)
    second_gets = len(gets(served['server'], '/image.tar.zst'))
    return dict(store=store, first=first, second=second, first_gets=first_gets, second_gets=second_gets)


def test_both_roles_converge_then_change_nothing(converged):
    first, second = converged['first'], converged['second']
    assert first.task('image_cache : Fetch the images')['changed'] is True
    assert converged['first_gets'] == 2
    assert second.changed() == [], 'second run changed: %s' % second.changed()
    assert converged['second_gets'] == 0, 'a cached image must cause no download'
    apt = second.task('hypervisor : Install QEMU and the Python libraries of the modules')
    assert apt['changed'] is False and not apt.get('skipped')
    for package in ('qemu-system-x86', 'qemu-utils', 'zstd', 'python3-zstandard', 'python3-requests'):
        status = subprocess.run(['dpkg-query', '-W', '-f', '${Status}', package], stdout=subprocess.PIPE,
                                universal_newlines=True, check=False).stdout
        assert status == 'install ok installed', package


def test_kvm_group_device_and_facts(converged):
    run = converged['second']
    kvm_group = grp.getgrnam('kvm')
    if os.path.exists(KVM):
        st = os.stat(KVM)
        assert st.st_gid == kvm_group.gr_gid and stat.S_IMODE(st.st_mode) == 0o660
    assert not os.path.exists(UDEV_RULE), 'group kvm is left to the distribution rules'

    facts = run.task('hypervisor : Set the hypervisor facts')['ansible_facts']
    info = run.task('Probe again')
    cached = run.task('Show the cached facts')['msg']
    assert facts['vmimage_kvm_usable'] is info['kvm']['usable']
    assert facts['vmimage_kvm_reason'] == info['kvm']['reason']
    assert facts['vmimage_accelerator'] == info['accelerator'] == ('kvm' if info['kvm']['usable'] else 'tcg')
    assert facts['vmimage_qemu_version'] == info['qemu']['system_version']
    assert cached == dict(usable=facts['vmimage_kvm_usable'], reason=facts['vmimage_kvm_reason'],
                          accelerator=facts['vmimage_accelerator'], qemu_version=facts['vmimage_qemu_version'])
    # The same answers as the library in this (root) process.
    here = probe_host()
    assert {k: v for k, v in info['kvm'].items() if k != 'cached'} == \
        {k: v for k, v in here['kvm'].items() if k != 'cached'}
    assert info['kvm']['device_usable'] is host_probe.probe_kvm().usable
    assert facts['vmimage_qemu_version'] == host_probe.qemu_versions()['system_version']
    assert info['python']['executable'] == SYSTEM_PYTHON
    assert info['python']['zstandard'] and info['python']['requests'], 'the distribution libraries import'


def test_store_owner_group_mode_and_report(converged, served):
    st = os.stat(converged['store'])
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, grp.getgrnam('kvm').gr_gid, 0o770)
    first, second = report_of(converged['first']), report_of(converged['second'])
    assert first['store'] == converged['store']
    assert (first['fetched'], first['present'], first['removed']) == (['alpha', 'beta'], [], [])
    assert (second['fetched'], second['present'], second['removed']) == ([], ['alpha', 'beta'], [])
    expected = sorted((served['digest'][k], [k]) for k in ('alpha', 'beta'))
    assert sorted((i['digest'], i['aliases']) for i in second['images']) == expected
    assert second['usage']['images'] == 2 and second['usage']['allocated_size'] > 0
    summary = converged['second'].task('image_cache : Summarise the image cache')['msg']
    assert summary[0].startswith('store %s: 2 image(s)' % converged['store'])
    assert summary[1:4] == ['fetched: -', 'already present: alpha, beta', 'removed: -']


def test_absent_removal_and_report(converged, served, tmp_path):
    store = str(tmp_path / 'store')

    def cache(images):
        return [play(roles=[role('image_cache', image_cache_store=store, image_cache_images=images)])]

    # The starting state comes from the library itself (a role run less).
    seed = ImageStore(store)
    for key in ('alpha', 'beta'):
        fetch_image(seed, served['url'][key], checksum=served['digest'][key], alias=key)
    served['server'].clear_requests()
    wanted = [image_entry(served, 'alpha'), image_entry(served, 'beta', state='absent'), image_entry(served, 'gamma')]
    changed = run_plays(cache(wanted), tmp_path)
    report = report_of(changed)
    assert (report['fetched'], report['present'], report['removed']) == (['gamma'], ['alpha'], ['beta'])
    assert sorted(i['aliases'][0] for i in report['images']) == ['alpha', 'gamma']
    assert served['digest']['beta'] not in [i['digest'] for i in report['images']]
    assert [r.path for r in gets(served['server'], '/')] == ['/gamma/image.tar.zst']

    again = run_plays(cache(wanted), tmp_path)
    assert again.changed() == []
    report = report_of(again)
    assert (report['fetched'], report['present'], report['removed']) == ([], ['alpha', 'gamma'], [])


def test_check_mode_on_a_fresh_store(converged, served, tmp_path):
    store = str(tmp_path / 'fresh' / 'store')
    group = 'vmimage-check%d' % (os.getpid() % 100000)
    run = run_plays([play(roles=[
        # The store group does not exist (in a real run the hypervisor role would make it).
        role('image_cache', image_cache_store=store, image_cache_group=group,
             image_cache_images=[image_entry(served, 'alpha'), image_entry(served, 'beta', state='absent')]),
        # Nor does the KVM group: the tasks naming it cannot run in check mode.
        role('hypervisor', hypervisor_kvm_group=group, hypervisor_kvm_users=['root']),
    ])], tmp_path, check=True)
    assert not os.path.exists(store), 'check mode must not create the store'
    with pytest.raises(KeyError):
        grp.getgrnam(group)
    assert not os.path.exists(UDEV_RULE)
    changed = set(n.split(' : ', 1)[1] for n in run.changed())
    assert {'Create the KVM group', 'Write the udev rule giving /dev/kvm to the group',
            'Create the image store folder', 'Fetch the images'} <= changed, changed
    assert changed <= {'Create the KVM group', 'Create the udev rules folder',
                       'Write the udev rule giving /dev/kvm to the group', 'Create the image store folder',
                       'Fetch the images'}, changed
    assert run.task('Add the users to the KVM group').get('skipped') is True
    report = report_of(run)
    assert (report['fetched'], report['present'], report['removed']) == (['alpha'], [], [])
    assert report['images'] == [] and report['usage']['images'] == 0
    summary = run.task('image_cache : Summarise the image cache')['msg']
    assert 'would fetch: alpha' in summary and 'would remove: -' in summary


def test_bad_input_fails_with_clear_messages(converged, served, tmp_path):
    store = str(tmp_path / 'store')
    good = image_entry(served, 'alpha')
    run = run_plays([play(tasks=[
        expect_failure(include_role('image_cache', image_cache_store=store, image_cache_images=[
            {'url': served['url']['alpha']}, dict(good, state='gone'), {'image_id': 'no-url'}])),
        expect_failure(include_role('image_cache', image_cache_store=store, image_cache_images=[good, good])),
        expect_failure(include_role('image_cache', image_cache_store=store, image_cache_group='vmimage-no-such-group',
                                    image_cache_images=[good])),
        expect_failure(include_role('hypervisor', hypervisor_install_packages=False,
                                    hypervisor_kvm_users=['vmimage-no-such-user'])),
    ])], tmp_path)
    messages = [r['msg'] for n, r in zip(run.names, run.results) if r.get('failed')]
    assert len(messages) == 4, messages
    spec, duplicate, group, user = messages
    assert 'missing required arguments: image_id found in image_cache_images' in spec
    assert 'value of state must be one of: present, absent, got: gone found in image_cache_images' in spec
    assert 'state is present but all of the following are missing: url found in image_cache_images' in spec
    assert duplicate == 'image_cache_images names these image_id more than once: alpha'
    assert group.strip() == 'image_cache_group vmimage-no-such-group is not a group on this host.'
    assert 'hypervisor_kvm_users names users that do not exist on this host: vmimage-no-such-user' in user
    assert not os.path.exists(store), 'nothing happens before the input is accepted'
    assert len([n for n in run.names if n == 'Rescued']) == 4


def test_platform_check(converged, tmp_path):
    quiet = dict(hypervisor_install_packages=False)
    run = run_plays([play(gather_facts=True, tasks=[
        override_platform('Ubuntu', '22.04', '22'),
        include_role('hypervisor', **quiet),
        override_platform('Fedora', '40', '40'),
        include_role('hypervisor', hypervisor_allow_unsupported=True, **quiet),
        expect_failure(include_role('hypervisor', **quiet)),
    ])], tmp_path)
    warnings = [r for n, r in zip(run.names, run.results) if n.endswith('Warn that the platform is unsupported')]
    assert [w.get('skipped', False) for w in warnings] == [True, False]
    assert warnings[1]['msg'].startswith('WARNING: Fedora 40 is not a supported platform')
    failure = [r for r in run.results if r.get('failed')]
    assert len(failure) == 1
    assert failure[0]['msg'] == ('vmimage.qemu.hypervisor supports Debian 12 (bookworm), Ubuntu 22.04 (jammy), '
                                 'Ubuntu 24.04 (noble); this host runs Fedora 40. '
                                 'Set hypervisor_allow_unsupported to true to try it anyway.')


@pytest.fixture
def kvm_user():
    """A throw-away group and user, removed afterwards with the udev rule."""
    suffix = os.getpid() % 100000
    group, user = 'vmimage-kvm%d' % suffix, 'vmimage-u%d' % suffix
    # The role creates /etc/udev/rules.d (and /etc/udev) when udev is not installed.
    created = [d for d in ('/etc/udev', '/etc/udev/rules.d') if not os.path.isdir(d)]
    subprocess.run(['useradd', '--system', '--no-create-home', '--shell', '/usr/sbin/nologin', user], check=True)
    try:
        yield group, user
    finally:
        subprocess.run(['userdel', user], check=False)
        subprocess.run(['groupdel', group], check=False)
        if os.path.exists(UDEV_RULE):
            os.unlink(UDEV_RULE)
        for folder in reversed(created):
            if os.path.isdir(folder):
                os.rmdir(folder)


def test_custom_kvm_group_with_users(converged, tmp_path, kvm_user):
    group, user = kvm_user
    assert 'is not in group' in probe_as_user(user)['reason'] or not os.path.exists(KVM)
    custom = run_plays([play(roles=[role('hypervisor', hypervisor_install_packages=False, hypervisor_kvm_group=group,
                                         hypervisor_kvm_users=[user])])], tmp_path)
    assert custom.task('Create the KVM group')['changed'] is True
    assert user in grp.getgrnam(group).gr_mem
    with open(UDEV_RULE) as f:
        rule = f.read()
    assert 'SUBSYSTEM=="misc", KERNEL=="kvm", GROUP="%s", MODE="0660"' % group in rule
    assert stat.S_IMODE(os.stat(UDEV_RULE).st_mode) == 0o644
    if os.path.exists(KVM):
        st = os.stat(KVM)
        assert st.st_gid == grp.getgrnam(group).gr_gid and stat.S_IMODE(st.st_mode) == 0o660
        # The kernel now lets the user in exactly when it lets root in.
        as_user = probe_as_user(user)
        assert as_user['usable'] == host_probe.probe_kvm().usable, as_user

    back = run_plays([play(roles=[role('hypervisor', hypervisor_install_packages=False)])], tmp_path)
    assert 'vmimage.qemu.hypervisor : Give the live KVM device to the group' in back.changed()
    assert not os.path.exists(UDEV_RULE)
    if os.path.exists(KVM):
        assert os.stat(KVM).st_gid == grp.getgrnam('kvm').gr_gid


def test_prune_after_the_fetches_rotates_the_store(converged, served, tmp_path):
    store = str(tmp_path / 'store')

    def cache(key, prune):
        entry = dict(image_id='nightly', url=served['url'][key], checksum=served['digest'][key])
        options = dict(image_cache_prune=prune) if prune is not None else dict(image_cache_prune_enabled=False)
        return [play(roles=[role('image_cache', image_cache_store=store, image_cache_images=[entry], **options)])]

    report_of(run_plays(cache('alpha', {'min_age': 0}), tmp_path))
    young = report_of(run_plays(cache('beta', {}), tmp_path))
    assert young['pruned'] == [] and len(young['images']) == 2, 'the default min_age keeps an image fetched just now'
    rotated = report_of(run_plays(cache('gamma', {'min_age': 0}), tmp_path))
    assert sorted(p['digest'] for p in rotated['pruned']) == sorted(served['digest'][k] for k in ('alpha', 'beta'))
    assert all(p['reason'] == 'unreferenced' for p in rotated['pruned']) and int(rotated['freed_bytes']) > 0
    assert [i['digest'] for i in rotated['images']] == [served['digest']['gamma']]
    skipped = report_of(run_plays(cache('alpha', None), tmp_path))
    assert skipped['pruned'] == [] and len(skipped['images']) == 2, 'image_cache_prune_enabled: false skips pruning'
