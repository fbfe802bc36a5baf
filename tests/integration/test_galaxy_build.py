# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection as users get it: ``ansible-galaxy collection build`` makes a
tarball without development trees, ``ansible-galaxy collection install``
installs it, and its modules run from the installed copy, with only that copy
on the collections path (not the checkout that tests/conftest.py exports).

The image fetched here is packed by GNU tar and the zstd CLI, so nothing from
the checkout's library is involved in making it either."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile

from support.image_factory import gnu_tar_archive, make_image_folder, pattern

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)

# Development-only paths that must never be in the published artifact.
FORBIDDEN = re.compile(r'^(\.venv|\.venv-[^/]*|build|tests/output|bench/output|\.git|\.pytest_cache|\.ansible|'
                       r'\.ci|\.cache|\.mypy_cache|\.tox)(/|$)|(^|/)__pycache__(/|$)|\.pyc$|\.tar\.(gz|zst)$|'
                       r'^changelogs/\.plugin-cache\.yaml$')


def _run(argv, env=None, cwd=None):
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          env=env, cwd=cwd, timeout=120, check=False)
    assert proc.returncode == 0, '%s failed (rc %d):\n%s\n%s' % (
        ' '.join(argv), proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def _isolated_env(collections, home):
    """The environment of a user who only has the installed collection."""
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=collections,
        # The controller's own sys.path must not contribute collections either.
        ANSIBLE_COLLECTIONS_SCAN_SYS_PATH='false',
        ANSIBLE_HOME=home, ANSIBLE_LOCAL_TEMP=os.path.join(home, 'tmp'),
        ANSIBLE_NOCOLOR='1', ANSIBLE_FORCE_COLOR='0', ANSIBLE_LOCALHOST_WARNING='0',
        ANSIBLE_INVENTORY_UNPARSED_WARNING='0', ANSIBLE_DEPRECATION_WARNINGS='0',
        ANSIBLE_STDOUT_CALLBACK='minimal', ANSIBLE_LOAD_CALLBACK_PLUGINS='0',
    )
    return env


def _adhoc(module, args, env, cwd):
    """Run ``ansible localhost -m module -a args -vvv``; return (result, module file used)."""
    proc = subprocess.run(
        [os.path.join(BIN, 'ansible'), 'localhost', '-i', 'localhost,', '-c', 'local', '-m', module, '-a', args,
         '-e', 'ansible_python_interpreter=%s' % sys.executable, '-vvv'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env, cwd=cwd,
        timeout=120, check=False)
    out = proc.stdout
    used = re.findall(r'^Using module file (\S+)$', out, re.M)
    match = re.search(r'^localhost \| (\w+!?)(?: \| rc=\d+)? => ', out, re.M)
    assert match, 'no result from ansible -m %s (rc %d):\n%s\n%s' % (module, proc.returncode, out[-3000:],
                                                                     proc.stderr[-3000:])
    result, _end = json.JSONDecoder().raw_decode(out, match.end())
    assert proc.returncode == 0 and match.group(1) in ('SUCCESS', 'CHANGED'), \
        'ansible -m %s failed:\n%s\n%s' % (module, json.dumps(result, indent=1)[-3000:], proc.stderr[-2000:])
    return result, used


def test_build_install_and_run_from_the_installed_copy(tmp_path):
    # ------------------------------------------------------------ build
    dist = tmp_path / 'dist'
    dist.mkdir()
    _run([os.path.join(BIN, 'ansible-galaxy'), 'collection', 'build', '--output-path', str(dist), REPO], cwd=str(tmp_path))
    tarballs = glob.glob(str(dist / 'vmimage-qemu-*.tar.gz'))
    assert len(tarballs) == 1
    with tarfile.open(tarballs[0]) as tar:
        names = set(m.name.rstrip('/') for m in tar.getmembers())
        files_json = json.load(tar.extractfile('FILES.json'))
    leaked = sorted(n for n in names if FORBIDDEN.search(n))
    assert not leaked, 'development files in the collection artifact: %s' % leaked[:20]
    assert set(f['name'] for f in files_json['files'] if f['name'] != '.') | {'MANIFEST.json', 'FILES.json'} == names

    expected = {'MANIFEST.json', 'FILES.json', 'README.md', 'meta/runtime.yml', 'docs/guide.md',
                'changelogs/changelog.yaml', 'changelogs/config.yaml'}
    modules = [os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'plugins', 'modules', '*.py'))]
    assert modules
    expected.update(modules)
    expected.update(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'plugins', '*', '*.py')))
    roles = [os.path.relpath(p, REPO)
             for p in glob.glob(os.path.join(REPO, 'roles', '*', 'meta', 'argument_specs.yml'))]
    expected.update(roles)
    expected.update(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'docs', 'reference', '*')))
    missing = sorted(expected - names)
    assert not missing, 'missing from the collection artifact: %s' % missing

    # ------------------------------------------------------------ install
    collections = str(tmp_path / 'collections')
    home = str(tmp_path / 'ansible-home')
    env = _isolated_env(collections, home)
    _run([os.path.join(BIN, 'ansible-galaxy'), 'collection', 'install', '--offline', '-p', collections, tarballs[0]],
         env=env, cwd=str(tmp_path))
    installed = os.path.join(collections, 'ansible_collections', 'vmimage', 'qemu')
    assert os.path.isfile(os.path.join(installed, 'MANIFEST.json'))
    assert not os.path.islink(installed) and os.path.realpath(installed) != os.path.realpath(REPO)
    checkout_path = os.environ.get('ANSIBLE_COLLECTIONS_PATH', '')
    assert collections not in checkout_path.split(os.pathsep)

    doc = json.loads(_run([os.path.join(BIN, 'ansible-doc'), '--json', '-t', 'module', 'vmimage.qemu.vm_image_fetch'],
                          env=env, cwd=str(tmp_path)).stdout)
    assert doc['vmimage.qemu.vm_image_fetch']['doc']['filename'] == os.path.join(
        installed, 'plugins', 'modules', 'vm_image_fetch.py')
    for spec in roles:
        role = spec.split('/')[1]
        role_doc = json.loads(_run([os.path.join(BIN, 'ansible-doc'), '--json', '-t', 'role', 'vmimage.qemu.' + role],
                                   env=env, cwd=str(tmp_path)).stdout)
        assert role_doc['vmimage.qemu.' + role]['path'].startswith(installed)

    # ------------------------------------------------------------ run
    store = str(tmp_path / 'store')
    info, used = _adhoc('vmimage.qemu.vm_image_info', 'store=%s' % store, env, str(tmp_path))
    assert used == [os.path.join(installed, 'plugins', 'modules', 'vm_image_info.py')]
    assert info['changed'] is False and info['exists'] is False and info['usage']['images'] == 0

    folder = make_image_folder(str(tmp_path / 'image'), disk_size=4 * 1024 * 1024,
                               chunks=[(0, pattern(4096, 7)), (3 * 1024 * 1024, pattern(8192, 8))],
                               machine={'version': 1, 'memory': 256})
    archive = gnu_tar_archive(folder, str(tmp_path / 'image.tar.zst'))
    with open(archive, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    fetched, used = _adhoc('vmimage.qemu.vm_image_fetch',
                           'url=file://%s checksum=sha256:%s image_id=galaxy-smoke store=%s' % (archive, digest, store),
                           env, str(tmp_path))
    assert used == [os.path.join(installed, 'plugins', 'modules', 'vm_image_fetch.py')]
    assert fetched['changed'] is True and fetched['downloaded'] is True
    assert fetched['digest'] == 'sha256:' + digest and fetched['image_id'] == 'galaxy-smoke'
    assert fetched['disk'].startswith(store + os.sep) and os.path.isfile(fetched['disk'])
    assert fetched['virtual_size'] == 4 * 1024 * 1024 and fetched['machine']['memory'] == 256

    info, used = _adhoc('vmimage.qemu.vm_image_info', 'store=%s image=galaxy-smoke' % store, env, str(tmp_path))
    assert [i['digest'] for i in info['images']] == ['sha256:' + digest]
    assert info['images'][0]['aliases'] == ['galaxy-smoke']
