# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tests for running qemu-img safely: real qemu-img, real limits."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import select
import shutil
import struct
import subprocess
import time

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._qemu import qemu_img as qi
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    LimitExceededError, QemuImgError, UnsafeImageError,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.limits import ImageLimits, MIB
from ansible_collections.vmimage.qemu.plugins.module_utils._formats.qcow2 import (
    check_layer, read_qcow2_header,
)

pytestmark = pytest.mark.skipif(shutil.which('qemu-img') is None, reason='qemu-img not installed')

DISK_SIZE = 64 * MIB
# A CPU-bound qemu-img command that needs no file: benchmark the null driver.
BUSY = ['bench', '-c', '2000000000', '--image-opts', 'driver=null-co,size=1G']


def qemu_img(*args, **kw):
    # Relative names in options (data_file=...) resolve against cwd: keep it in tmp.
    return subprocess.run(['qemu-img'] + [str(a) for a in args], check=True, cwd=kw.get('cwd'),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def make_image_folder(folder, layer_options=''):
    with open(folder / 'disk.img', 'wb') as f:
        f.truncate(DISK_SIZE)
    opts = 'backing_file=disk.img,backing_fmt=raw,lazy_refcounts=on' + layer_options
    qemu_img('create', '-q', '-f', 'qcow2', '-o', opts, folder / 'layer.qcow2')
    return folder


def patch(path, offset, fmt, value):
    with open(path, 'r+b') as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


# ------------------------------------------------------------- the runner ---

def test_find_qemu_img():
    path = qi.find_qemu_img()
    assert os.path.basename(path) == 'qemu-img' and os.access(path, os.X_OK)


def test_missing_qemu_img_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv('PATH', str(tmp_path))
    with pytest.raises(QemuImgError, match='^qemu-img not found; install qemu-utils$'):
        qi.find_qemu_img()
    with pytest.raises(QemuImgError, match='qemu-img not found'):
        qi.run_qemu_img(['--version'])
    with pytest.raises(QemuImgError, match='qemu-img not found'):
        qi.run_qemu_img(['--version'], qemu_img=str(tmp_path / 'qemu-img'))


@pytest.mark.parametrize('args', ['info -f raw /etc/passwd', b'--version'])
def test_command_strings_are_refused(args):
    with pytest.raises(TypeError, match='argument list'):
        qi.run_qemu_img(args)


def test_arguments_are_never_shell_interpreted(tmp_path):
    marker = tmp_path / 'pwned'
    result = qi.run_qemu_img(['info', '-f', 'raw', '--output', 'json',
                              '%s; touch %s' % (tmp_path / 'x', marker)], check=False)
    assert result.returncode != 0
    assert not marker.exists()


def test_successful_run_returns_output():
    result = qi.run_qemu_img(['--version'])
    assert result.returncode == 0
    assert 'qemu-img version' in result.stdout
    assert result.argv[1:] == ['--version']


def test_memory_limit_stops_qemu_img():
    limits = ImageLimits(qemu_img_memory=16 * MIB)
    with pytest.raises(QemuImgError) as err:
        qi.run_qemu_img(BUSY, limits=limits, timeout=60)
    text = str(err.value)
    assert text.startswith('qemu-img bench ')
    assert 'address-space limit of 16 MiB' in text


def test_cpu_limit_stops_qemu_img():
    limits = ImageLimits(qemu_img_cpu_seconds=1)
    start = time.monotonic()
    with pytest.raises(QemuImgError) as err:
        qi.run_qemu_img(BUSY, limits=limits, timeout=60)
    assert 'killed by SIGXCPU: CPU limit of 1 s reached' in str(err.value)
    assert time.monotonic() - start < 30


def test_wall_clock_timeout_kills_qemu_img():
    start = time.monotonic()
    with pytest.raises(QemuImgError, match=r'timed out after 0.5 s \(wall clock\)'):
        qi.run_qemu_img(BUSY, timeout=0.5)
    assert time.monotonic() - start < 10


def test_limits_and_environment_reach_the_child(monkeypatch):
    # Run /bin/cat in qemu-img's place to look at what the child really got.
    monkeypatch.setenv('VMIMAGE_TEST_SECRET', 'do-not-leak')
    limits = ImageLimits(qemu_img_cpu_seconds=7, qemu_img_memory=900 * MIB)
    out = qi.run_qemu_img(['/proc/self/limits', '/proc/self/environ'], limits=limits,
                          qemu_img=shutil.which('cat')).stdout
    lines = {line[:26].strip(): line[26:].split() for line in out.splitlines()
             if line.startswith('Max ')}
    assert lines['Max cpu time'][:2] == ['7', '8']
    assert lines['Max address space'][:2] == [str(900 * MIB)] * 2
    assert lines['Max core file size'][:2] == ['0', '0']
    assert 'LC_ALL=C\0' in out
    assert 'do-not-leak' not in out


def test_nonzero_exit_reports_status_and_stderr(tmp_path):
    raw = tmp_path / 'disk.img'
    raw.write_bytes(b'\0' * 4096)
    with pytest.raises(QemuImgError) as err:
        qi.run_qemu_img(['info', '-f', 'qcow2', str(raw)])
    text = str(err.value)
    assert 'qemu-img info -f qcow2 %s failed: exit status 1' % raw in text
    assert 'Image is not in qcow2 format' in text
    result = qi.run_qemu_img(['info', '-f', 'qcow2', str(raw)], check=False)
    assert result.returncode == 1 and 'not in qcow2 format' in result.stderr


def test_output_is_bounded(tmp_path):
    big = tmp_path / 'big'
    big.write_bytes(b'x' * (2 * MIB))
    with pytest.raises(QemuImgError, match='output of 2097152 bytes exceeds the limit of 1048576'):
        qi.run_qemu_img([str(big)], qemu_img=shutil.which('cat'), max_output=1 * MIB)


# ------------------------------------------------------------------ info ---

@pytest.mark.parametrize('fmt', [None, ''])
def test_info_refuses_to_probe(tmp_path, fmt):
    with pytest.raises(ValueError, match='explicit format'):
        qi.qemu_img_info(str(tmp_path / 'disk.img'), fmt)


@pytest.mark.parametrize('fmt', ['raw,file.filename=/etc/passwd', 'RAW', '-U', 'qcow2 '])
def test_info_refuses_odd_format_names(tmp_path, fmt):
    with pytest.raises(ValueError, match='invalid format'):
        qi.qemu_img_info(str(tmp_path / 'disk.img'), fmt)


def test_info_on_real_raw_and_qcow2(tmp_path):
    make_image_folder(tmp_path)
    disk = qi.qemu_img_info(str(tmp_path / 'disk.img'), 'raw')
    assert disk['format'] == 'raw' and disk['virtual-size'] == DISK_SIZE
    assert 'backing-filename' not in disk
    layer = qi.qemu_img_info(str(tmp_path / 'layer.qcow2'), 'qcow2')
    assert layer['format'] == 'qcow2'
    assert layer['backing-filename'] == 'disk.img'
    assert layer['backing-filename-format'] == 'raw'
    chain = qi.qemu_img_info(str(tmp_path / 'layer.qcow2'), 'qcow2', backing_chain=True)
    assert [i['format'] for i in chain] == ['qcow2', 'raw']


def test_explicit_format_wins_over_content(tmp_path):
    # A qcow2 file read with -f raw is just bytes: no backing is followed.
    qemu_img('create', '-q', '-f', 'qcow2', '-u', '-b', '/etc/passwd', '-F', 'raw',
             tmp_path / 'disk.img', '1G')
    info = qi.qemu_img_info(str(tmp_path / 'disk.img'), 'raw')
    assert info['format'] == 'raw' and 'backing-filename' not in info


@pytest.mark.parametrize('name', ['nbd:localhost:1', 'json:{"driver":"null-co"}', '-U', '--help'])
def test_file_names_are_never_protocols_or_options(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / name, 'wb') as f:
        f.truncate(3 * MIB)
    info = qi.qemu_img_info(name, 'raw')
    assert info['virtual-size'] == 3 * MIB
    assert info['filename'] == str(tmp_path / name)


def test_force_share_reads_an_image_a_vm_holds_open(tmp_path):
    make_image_folder(tmp_path)
    layer = str(tmp_path / 'layer.qcow2')
    # qemu-io in interactive mode keeps the image open read-write (and locked)
    # until its stdin closes, like a running VM.  It answers 'length' only
    # once the image is open; nothing else may touch the image before that,
    # or qemu-io itself would fail to get its write lock.
    holder = subprocess.Popen(['qemu-io', '-f', 'qcow2', layer], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=str(tmp_path))
    try:
        holder.stdin.write(b'length\n')
        holder.stdin.flush()
        ready, _w, _x = select.select([holder.stdout], [], [], 20)
        assert ready, 'qemu-io did not answer'
        answer = holder.stdout.readline()
        assert b'MiB' in answer, (answer, holder.poll())
        probe = subprocess.run(['qemu-img', 'info', '-f', 'qcow2', layer],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
        if probe.returncode == 0:
            pytest.skip('image locking is not available on this file system')
        with pytest.raises(QemuImgError, match='lock'):
            qi.qemu_img_info(layer, 'qcow2', force_share=False)
        assert qi.qemu_img_info(layer, 'qcow2')['format'] == 'qcow2'
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
        holder.stderr.close()


# -------------------------------------------------------------- validate ---

def test_validate_good_folder(tmp_path):
    make_image_folder(tmp_path)
    result = qi.validate_with_qemu_img(str(tmp_path))
    assert result['disk_virtual_size'] == DISK_SIZE
    assert result['layer_virtual_size'] == DISK_SIZE
    assert result['layer_actual_size'] > 0
    assert set(result) == {'disk_virtual_size', 'disk_actual_size', 'layer_virtual_size',
                           'layer_actual_size'}


def _rebase(backing, fmt):
    def mutate(folder):
        qemu_img('rebase', '-u', '-f', 'qcow2', '-b', backing, '-F', fmt, folder / 'layer.qcow2')
    return mutate


def _patch_layer(offset, fmt, value):
    return lambda folder: patch(folder / 'layer.qcow2', offset, fmt, value)


def _snapshot(folder):
    qemu_img('snapshot', '-c', 's1', folder / 'layer.qcow2')


def _data_file(folder):
    os.unlink(folder / 'layer.qcow2')
    qemu_img('create', '-q', '-f', 'qcow2', '-o',
             'backing_file=disk.img,backing_fmt=raw,data_file=data.raw', folder / 'layer.qcow2', cwd=folder)


def _dirty(folder):
    subprocess.run(['qemu-io', '-f', 'qcow2', '-c', 'write -P 1 0 64k', '-c', 'abort',
                    str(folder / 'layer.qcow2')], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   preexec_fn=lambda: __import__('resource').setrlimit(
                       __import__('resource').RLIMIT_CORE, (0, 0)), check=False)


# (id, mutation, python-check message, qemu-img-check message)
BAD_LAYERS = [
    ('backing-host-file', _rebase('/etc/passwd', 'raw'),
     "backing file must be exactly 'disk.img', got '/etc/passwd'",
     "qemu-img reports backing file '/etc/passwd', expected exactly 'disk.img'"),
    ('backing-parent-dir', _rebase('../disk.img', 'raw'),
     "got '../disk.img'", "qemu-img reports backing file '../disk.img'"),
    ('backing-json', _rebase('json:{"file":{"driver":"file","filename":"/etc/passwd"}}', 'raw'),
     'json: pseudo-protocol', 'json: pseudo-protocol'),
    ('backing-format-qcow2', _rebase('disk.img', 'qcow2'),
     "backing format must be exactly 'raw', got 'qcow2'",
     "qemu-img reports backing format 'qcow2', expected exactly raw"),
    ('dirty', _dirty, 'dirty (bit 0)', 'qemu-img reports the dirty flag set'),
    ('corrupt', _patch_layer(72, '>Q', 2), 'corrupt (bit 1)', 'qemu-img reports the corrupt flag set'),
    ('snapshot', _snapshot, '1 internal snapshot', 'qemu-img reports 1 internal snapshot'),
    ('data-file', _data_file, "external data file 'data.raw' is not allowed (CVE-2024-32498)",
     "qemu-img reports external data file 'data.raw' (CVE-2024-32498)"),
]


@pytest.mark.parametrize('mutate,py_message,qemu_message', [b[1:] for b in BAD_LAYERS],
                         ids=[b[0] for b in BAD_LAYERS])
def test_validate_rejects_bad_layers(tmp_path, mutate, py_message, qemu_message):
    make_image_folder(tmp_path)
    mutate(tmp_path)
    # Default: the pure-Python checks refuse before qemu-img sees the file.
    with pytest.raises(UnsafeImageError) as err:
        qi.validate_with_qemu_img(str(tmp_path))
    assert str(err.value).startswith('layer.qcow2: ')
    assert py_message in str(err.value)
    # Defence in depth: qemu-img's own report is checked as well.
    with pytest.raises(UnsafeImageError) as err:
        qi.validate_with_qemu_img(str(tmp_path), precheck=False)
    assert str(err.value).startswith('layer.qcow2: ')
    assert qemu_message in str(err.value)


def test_validate_rejects_disk_that_is_really_qcow2(tmp_path):
    make_image_folder(tmp_path)
    os.unlink(tmp_path / 'disk.img')
    qemu_img('create', '-q', '-f', 'qcow2', '-u', '-b', '/etc/shadow', '-F', 'raw',
             tmp_path / 'disk.img', str(DISK_SIZE))
    with pytest.raises(UnsafeImageError, match=r'disk.img: looks like a qcow2 image, not raw'):
        qi.validate_with_qemu_img(str(tmp_path))


def test_validate_rejects_symlinked_members(tmp_path):
    make_image_folder(tmp_path)
    os.rename(tmp_path / 'disk.img', tmp_path / 'real.img')
    os.symlink('real.img', tmp_path / 'disk.img')
    with pytest.raises(UnsafeImageError, match='disk.img: is not a regular file'):
        qi.validate_with_qemu_img(str(tmp_path), precheck=False)


def test_validate_rejects_missing_layer(tmp_path):
    make_image_folder(tmp_path)
    os.unlink(tmp_path / 'layer.qcow2')
    with pytest.raises(UnsafeImageError, match='layer.qcow2: missing'):
        qi.validate_with_qemu_img(str(tmp_path))


def test_validate_applies_size_limits(tmp_path):
    make_image_folder(tmp_path)
    limits = ImageLimits(max_member_size=DISK_SIZE, max_virtual_size=DISK_SIZE - 1)
    with pytest.raises(LimitExceededError, match='layer.qcow2: virtual size'):
        qi.validate_with_qemu_img(str(tmp_path), limits=limits)
    with pytest.raises(LimitExceededError, match='layer.qcow2: virtual size'):
        qi.validate_with_qemu_img(str(tmp_path), limits=limits, precheck=False)


def test_validate_runs_qemu_img_under_limits(tmp_path):
    make_image_folder(tmp_path)
    with pytest.raises(QemuImgError, match='address-space limit of 16 MiB'):
        qi.validate_with_qemu_img(str(tmp_path), limits=ImageLimits(qemu_img_memory=16 * MIB))


# ---------------------------------------------------------------- create ---

def test_create_overlay_has_explicit_backing_format(tmp_path):
    make_image_folder(tmp_path)
    overlay = tmp_path / 'instance.qcow2'
    size = qi.create_overlay(str(overlay), 'disk.img', 'raw')
    assert size == os.path.getsize(overlay)
    info = json.loads(qemu_img('info', '-U', '-f', 'qcow2', '--output', 'json', overlay).stdout)
    assert info['backing-filename'] == 'disk.img'
    assert info['backing-filename-format'] == 'raw'
    assert info['virtual-size'] == DISK_SIZE
    assert info['format-specific']['data']['lazy-refcounts'] is True
    # What we create passes our own strictest check.
    check_layer(read_qcow2_header(str(overlay)), name='instance.qcow2')
    assert sorted(os.listdir(tmp_path)) == ['disk.img', 'instance.qcow2', 'layer.qcow2']


def test_create_overlay_over_a_qcow2_layer(tmp_path):
    make_image_folder(tmp_path)
    overlay = tmp_path / 'child.qcow2'
    qi.create_overlay(str(overlay), 'layer.qcow2', 'qcow2', extra_options={}, size=128 * MIB)
    info = qi.qemu_img_info(str(overlay), 'qcow2')
    assert info['backing-filename-format'] == 'qcow2'
    assert info['virtual-size'] == 128 * MIB
    assert info['format-specific']['data']['lazy-refcounts'] is False


def test_create_overlay_never_overwrites(tmp_path):
    make_image_folder(tmp_path)
    existing = tmp_path / 'instance.qcow2'
    existing.write_bytes(b'precious')
    with pytest.raises(FileExistsError, match='already exists'):
        qi.create_overlay(str(existing), 'disk.img', 'raw')
    assert existing.read_bytes() == b'precious'
    assert sorted(os.listdir(tmp_path)) == ['disk.img', 'instance.qcow2', 'layer.qcow2']


def test_create_overlay_refuses_dangling_symlink_target(tmp_path):
    make_image_folder(tmp_path)
    os.symlink('/nonexistent/elsewhere', tmp_path / 'instance.qcow2')
    with pytest.raises(FileExistsError):
        qi.create_overlay(str(tmp_path / 'instance.qcow2'), 'disk.img', 'raw')


@pytest.mark.parametrize('fmt', [None, ''])
def test_create_overlay_requires_backing_format(tmp_path, fmt):
    with pytest.raises(ValueError, match='explicit backing format'):
        qi.create_overlay(str(tmp_path / 'o.qcow2'), 'disk.img', fmt)


@pytest.mark.parametrize('backing', ['json:{"driver":"file","filename":"/etc/passwd"}',
                                     'nbd:localhost:10809', 'disk.img\n', 'http://x/disk.img', ''])
def test_create_overlay_refuses_reinterpretable_backing_names(tmp_path, backing):
    with pytest.raises(ValueError):
        qi.create_overlay(str(tmp_path / 'o.qcow2'), backing, 'raw')
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize('options', [{'data_file': 'x'}, {'backing_file': 'x'}, {'encrypt.format': 'luks'},
                                     {'bad key': 'x'}])
def test_create_overlay_refuses_dangerous_options(tmp_path, options):
    with pytest.raises(ValueError):
        qi.create_overlay(str(tmp_path / 'o.qcow2'), 'disk.img', 'raw', extra_options=options)


def test_create_overlay_failure_leaves_nothing(tmp_path):
    with pytest.raises(QemuImgError, match='qemu-img create .* failed: exit status 1'):
        qi.create_overlay(str(tmp_path / 'o.qcow2'), 'missing.img', 'raw')
    assert os.listdir(tmp_path) == []


def test_create_overlay_absolute_backing(tmp_path):
    make_image_folder(tmp_path)
    qi.create_overlay(str(tmp_path / 'sub.qcow2'), str(tmp_path / 'disk.img'), 'raw')
    info = qi.qemu_img_info(str(tmp_path / 'sub.qcow2'), 'qcow2')
    assert info['backing-filename'] == str(tmp_path / 'disk.img')
    assert info['backing-filename-format'] == 'raw'


def test_default_timeout_tracks_cpu_limit(monkeypatch):
    seen = {}
    real_popen = subprocess.Popen

    class _Spy(real_popen):
        def wait(self, timeout=None):
            seen.setdefault('timeout', timeout)
            return real_popen.wait(self, timeout)

    monkeypatch.setattr(qi.subprocess, 'Popen', _Spy)
    qi.run_qemu_img(['--version'], limits=ImageLimits(qemu_img_cpu_seconds=12))
    assert seen['timeout'] == 12 + 30
