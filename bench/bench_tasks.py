"""Fetch and pack the way users run them: one ansible-playbook task each,
against the reference pipelines run as ansible.builtin.shell tasks of the
same harness, so both carry the same Ansible overhead.

    python bench/bench_tasks.py [--apparent-gib 8] [--data-gib 1] [--rounds 3]

Alternating (A B C D A B C D ...), each a one-task play on localhost:
  fetch  vmimage.qemu.vm_image_fetch into an empty store (durable: it fsyncs)
         vs shell ``curl -s URL | zstd -dc | tar -S -xf -`` and the same
         ``&& sync -f DEST`` (the reference made durable)
  pack   vmimage.qemu.vm_image_package ``force: true`` to a fresh dest
         (durable) vs shell ``tar -S -cf - ... | zstd -T0 -3 -o OUT`` and
         the same ``&& sync -f OUT``
  unpack vmimage.qemu.vm_image_package ``from_archive`` into a new path
         (durable) vs shell ``zstd -dc ARCHIVE | tar -S -xf -`` and the same
         ``&& sync -f DEST``
  again  the idempotent re-runs of vm_image_fetch and vm_image_package
         against an ansible.builtin.stat task
Reports the task times (the callback's per-task seconds), medians, the
spread and the ratios against both references; JSON in bench/output/tasks.json.
"""

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GIB, MIB, REPO, ensure_collection_path, write_report  # noqa: E402

COLLECTIONS = ensure_collection_path()
sys.path.insert(0, os.path.join(REPO, 'tests'))
from support.ansible_run import run_playbook  # noqa: E402
from support.http_server import LocalHTTPServer  # noqa: E402
from bench_archive import build_source  # noqa: E402


def _task_seconds(work, task):
    run = run_playbook([task], work)
    return run.results[0]['_task_seconds']


def _shell(command):
    return {'ansible.builtin.shell': {'cmd': command, 'executable': '/bin/bash'}}


def _summary(samples):
    return {'median_s': round(statistics.median(samples), 3), 'min_s': round(min(samples), 3),
            'max_s': round(max(samples), 3), 'samples': [round(s, 3) for s in samples]}


def _fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def bench_fetch(work, url, rounds):
    store = os.path.join(work, 'store')
    dest = os.path.join(work, 'x-shell')
    q = shlex.quote
    pipeline = 'curl -sSf %s | zstd -q -dc | tar -S -C %s -xf -' % (q(url), q(dest))
    variants = (
        ('module', lambda: (shutil.rmtree(store, ignore_errors=True),
                            {'vmimage.qemu.vm_image_fetch': {'url': url, 'image_id': 'bench', 'store': store}})[1]),
        ('shell', lambda: (_fresh(dest), _shell(pipeline))[1]),
        ('shell_durable', lambda: (_fresh(dest), _shell('%s && sync -f %s' % (pipeline, q(dest))))[1]),
    )
    times = dict((name, []) for name, _task in variants)
    for _round in range(rounds):
        for name, task in variants:
            times[name].append(_task_seconds(work, task()))
    return times


def bench_pack(work, src, rounds):
    dest_dir = _fresh(os.path.join(work, 'archives'))
    ours = os.path.join(dest_dir, 'ours.tar.zst')
    ref = os.path.join(dest_dir, 'ref.tar.zst')
    layer_dir = os.path.join(work, 'layer')
    os.makedirs(layer_dir, exist_ok=True)
    shutil.copy(os.path.join(src, 'layer.qcow2'), os.path.join(layer_dir, 'layer.qcow2'))
    os.unlink(os.path.join(src, 'layer.qcow2'))  # a mutable image holds disk.img and machine.json
    q = shlex.quote
    pipeline = ('tar -S -cf - -C %s disk.img machine.json -C %s layer.qcow2 | zstd -q -T0 -3 -f -o %s'
                % (q(src), q(layer_dir), q(ref)))

    def module():
        for path in (ours, ours + '.vmimage.json'):
            if os.path.exists(path):
                os.unlink(path)
        return {'vmimage.qemu.vm_image_package': {'path': src, 'dest': ours, 'force': True}}

    variants = (
        ('module', module),
        ('shell', lambda: _shell(pipeline)),
        ('shell_durable', lambda: _shell('%s && sync -f %s' % (pipeline, q(ref)))),
    )
    times = dict((name, []) for name, _task in variants)
    for _round in range(rounds):
        for name, task in variants:
            times[name].append(_task_seconds(work, task()))
    return times, os.path.getsize(ours), os.path.getsize(ref)


def bench_unpack(work, archive, rounds):
    q = shlex.quote
    target = os.path.join(work, 'unpacked')
    dest = os.path.join(work, 'x-unpack')
    pipeline = 'zstd -q -dc %s | tar -S -C %s -xf -' % (q(archive), q(dest))

    def module():
        shutil.rmtree(target, ignore_errors=True)
        return {'vmimage.qemu.vm_image_package': {'path': target, 'from_archive': archive}}

    variants = (
        ('module', module),
        ('shell', lambda: (_fresh(dest), _shell(pipeline))[1]),
        ('shell_durable', lambda: (_fresh(dest), _shell('%s && sync -f %s' % (pipeline, q(dest))))[1]),
    )
    times = dict((name, []) for name, _task in variants)
    for _round in range(rounds):
        for name, task in variants:
            times[name].append(_task_seconds(work, task()))
    return times


def bench_again(work, url, src, archive, rounds):
    """Idempotent re-runs next to a stat task, in one play per round."""
    store = os.path.join(work, 'store-again')
    dest = os.path.join(work, 'again.tar.zst')
    run_playbook([{'vmimage.qemu.vm_image_fetch': {'url': url, 'image_id': 'bench', 'store': store}},
                  {'vmimage.qemu.vm_image_package': {'path': src, 'dest': dest}}], work)
    times = {'fetch': [], 'package': [], 'stat': []}
    for _round in range(rounds):
        run = run_playbook([
            {'vmimage.qemu.vm_image_fetch': {'url': url, 'image_id': 'bench', 'store': store}},
            {'ansible.builtin.stat': {'path': archive}},
            {'vmimage.qemu.vm_image_package': {'path': src, 'dest': dest}},
        ], work)
        assert not run.results[0]['changed'] and not run.results[2]['changed'], 'the re-runs must change nothing'
        times['fetch'].append(run.results[0]['_task_seconds'])
        times['stat'].append(run.results[1]['_task_seconds'])
        times['package'].append(run.results[2]['_task_seconds'])
    return times


def _ratios(times):
    module = statistics.median(times['module'])
    return {'vs_shell': round(module / statistics.median(times['shell']), 3),
            'vs_shell_durable': round(module / statistics.median(times['shell_durable']), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir')
    parser.add_argument('--apparent-gib', type=float, default=8)
    parser.add_argument('--data-gib', type=float, default=1)
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()
    os.environ['ANSIBLE_COLLECTIONS_PATH'] = COLLECTIONS
    work = tempfile.mkdtemp(prefix='vmimage-bench-tasks-', dir=args.workdir)
    try:
        src = os.path.join(work, 'src')
        data = build_source(src, int(args.apparent_gib * GIB), int(args.data_gib * GIB))
        archive = os.path.join(work, 'image.tar.zst')
        subprocess.run([sys.executable, os.path.join(REPO, 'bench', 'ours.py'), 'pack', src, archive], check=True)
        with LocalHTTPServer() as server:
            url = server.add('/image.tar.zst', file=archive)
            fetch = bench_fetch(work, url, args.rounds)
            pack, ours_size, ref_size = bench_pack(work, src, args.rounds)
            unpack = bench_unpack(work, archive, args.rounds)
            again = bench_again(work, url, src, archive, args.rounds)
        report = {
            'data_bytes': data, 'archive_bytes': os.path.getsize(archive), 'rounds': args.rounds,
            'fetch': dict((k, _summary(v)) for k, v in fetch.items()), 'fetch_ratio': _ratios(fetch),
            'pack': dict((k, _summary(v)) for k, v in pack.items()), 'pack_ratio': _ratios(pack),
            'pack_archive_bytes': {'module': ours_size, 'shell': ref_size},
            'unpack': dict((k, _summary(v)) for k, v in unpack.items()), 'unpack_ratio': _ratios(unpack),
            'again': dict((k, _summary(v)) for k, v in again.items()),
            'again_ratio': dict((k, round(statistics.median(again[k]) / statistics.median(again['stat']), 3))
                                for k in ('fetch', 'package')),
        }
        print('%.0f MiB of data, %.0f MiB archive, %d alternating rounds of one-task plays'
              % (data / MIB, report['archive_bytes'] / MIB, args.rounds))
        print('%-6s %-14s %9s %9s %9s' % ('work', 'task', 'median s', 'min s', 'max s'))
        for work_name in ('fetch', 'pack', 'unpack'):
            for task in ('module', 'shell', 'shell_durable'):
                row = report[work_name][task]
                print('%-6s %-14s %9.3f %9.3f %9.3f' % (work_name, task, row['median_s'], row['min_s'], row['max_s']))
            ratio = report[work_name + '_ratio']
            print('%-6s module / shell %.2fx, module / durable shell %.2fx'
                  % (work_name, ratio['vs_shell'], ratio['vs_shell_durable']))
        for task in ('fetch', 'package', 'stat'):
            row = report['again'][task]
            print('%-6s %-14s %9.3f %9.3f %9.3f' % ('again', task, row['median_s'], row['min_s'], row['max_s']))
        print('again  fetch / stat %.2fx, package / stat %.2fx'
              % (report['again_ratio']['fetch'], report['again_ratio']['package']))
        write_report('tasks', report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
