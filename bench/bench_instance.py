"""Instance creation cost: independent of the image's size, and the module's
wall time for a play that creates 20 instances.

    python bench/bench_instance.py [--workdir DIR] [--rounds 40] [--play-instances 20]

1. Two bootable images whose disk.img is 1 GiB and 50 GiB (apparent; the
   data is one boot sector) are fetched into one store from file:// URLs.
2. Library: InstanceManager.ensure_present() then remove(), alternating
   between the two images (A B A B ...), ``--rounds`` times each; also the
   bare ``qemu-img create -b`` the creation is built on.  Median, p90 and
   the ratio 50 GiB / 1 GiB are reported (target: ratio ~1, < 100 ms).
3. Module: ansible-playbook creating ``--play-instances`` instances with one
   looped vm_image_instance task, against the wall time of the same play with
   an empty loop (ansible's own start-up) and with a loop of
   ansible.builtin.ping (ansible's own cost per item), and the sum of the
   module's ``elapsed``.

Results are printed and written as JSON to bench/output/instance.json (--output).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GIB, REPO, ensure_collection_path  # noqa: E402

COLLECTIONS = ensure_collection_path()
sys.path.insert(0, os.path.join(REPO, 'tests'))

from support.ansible_run import ansible_env  # noqa: E402
from support.boot_image import make_boot_image_folder  # noqa: E402

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive  # noqa: E402
from ansible_collections.vmimage.qemu.plugins.module_utils._instance.instance import InstanceManager  # noqa: E402
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore  # noqa: E402

SIZES = (('1GiB', 1 * GIB), ('50GiB', 50 * GIB))


def _ms(seconds):
    return round(seconds * 1000, 2)


def _summary(samples):
    ordered = sorted(samples)
    return {
        'median_ms': _ms(statistics.median(ordered)),
        'p90_ms': _ms(ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]),
        'min_ms': _ms(ordered[0]),
        'max_ms': _ms(ordered[-1]),
        'n': len(ordered),
    }


def build_store(work):
    store = ImageStore(os.path.join(work, 'store'))
    digests = {}
    for label, size in SIZES:
        folder = make_boot_image_folder(os.path.join(work, 'src-' + label), disk_size=size)
        archive = os.path.join(work, label + '.tar.zst')
        with open(archive, 'wb') as f:
            write_image_archive(folder, f)
        digests[label] = fetch_image(store, 'file://' + archive, alias=label).digest
        shutil.rmtree(folder)
    return store, digests


def bench_library(store, rounds):
    manager = InstanceManager(store)
    create = dict((label, []) for label, _size in SIZES)
    remove = dict((label, []) for label, _size in SIZES)
    for i in range(rounds):
        for label, _size in SIZES if i % 2 == 0 else reversed(SIZES):
            name = 'bench-%s-%d' % (label, i)
            t = time.perf_counter()
            manager.ensure_present(name, label)
            create[label].append(time.perf_counter() - t)
            t = time.perf_counter()
            manager.remove(name)
            remove[label].append(time.perf_counter() - t)
    # The bare qemu-img call every creation makes, for reference.
    raw = dict((label, []) for label, _size in SIZES)
    tmp = tempfile.mkdtemp(dir=store.root)
    try:
        for i in range(rounds):
            for label, _size in SIZES:
                layer = os.path.join(store.image_path(store.resolve(label)), 'layer.qcow2')
                out = os.path.join(tmp, '%s-%d.qcow2' % (label, i))
                t = time.perf_counter()
                subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', layer, out],
                               check=True)
                raw[label].append(time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp)
    result = {}
    for label, _size in SIZES:
        result[label] = {'create': _summary(create[label]), 'remove': _summary(remove[label]),
                         'qemu_img_create': _summary(raw[label])}
    ratios = [b / a for a, b in zip(create['1GiB'], create['50GiB'])]
    result['ratio_50GiB_over_1GiB'] = round(statistics.median(ratios), 3)
    return result


def _play(work, store, names, baseline=False):
    if baseline:
        # The same loop with a module that does nothing: ansible's own cost per item.
        task = {'ansible.builtin.ping': {}}
    else:
        task = {'vmimage.qemu.vm_image_instance': {'name': '{{ item }}', 'image': '1GiB', 'store': store.root}}
    play = [{
        'hosts': 'localhost', 'connection': 'local', 'gather_facts': False,
        'vars': {'ansible_python_interpreter': sys.executable},
        'tasks': [dict(task, name='instances', loop=names, register='created'), {
            'name': 'module time',
            'ansible.builtin.debug': {'msg': "{{ created.results | map(attribute='elapsed', default=0) | sum }}"},
        }],
    }]
    path = os.path.join(work, 'play.json')
    with open(path, 'w') as f:
        json.dump(play, f)
    # The tests' JSON stdout callback (ansible-core no longer ships one).
    env = ansible_env({'ANSIBLE_COLLECTIONS_PATH': COLLECTIONS})
    cmd = [os.path.join(os.path.dirname(sys.executable), 'ansible-playbook'), '-i', 'localhost,', path]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit('ansible-playbook failed:\n%s\n%s' % (proc.stdout[-3000:], proc.stderr[-2000:]))
    doc = json.loads(proc.stdout[proc.stdout.index('{'):])
    module_s = float(doc['plays'][0]['tasks'][1]['hosts']['localhost']['msg'] or 0)
    return wall, module_s


def bench_module(work, store, count, rounds=2):
    manager = InstanceManager(store)
    empty, full, module, ping = [], [], [], []
    for i in range(rounds):
        empty.append(_play(work, store, [])[0])
        ping.append(_play(work, store, ['p%d' % n for n in range(count)], baseline=True)[0])
        names = ['play-%d-%02d' % (i, n) for n in range(count)]
        wall, module_s = _play(work, store, names)
        full.append(wall)
        module.append(module_s)
        for name in names:
            manager.remove(name)
    best = min(range(rounds), key=lambda k: full[k])
    return {
        'instances': count,
        'play_wall_s': round(statistics.median(full), 3),
        'empty_play_wall_s': round(statistics.median(empty), 3),
        'per_instance_wall_ms': _ms((statistics.median(full) - statistics.median(empty)) / count),
        'ping_loop_wall_s': round(statistics.median(ping), 3),
        'ping_per_item_wall_ms': _ms((statistics.median(ping) - statistics.median(empty)) / count),
        'module_elapsed_sum_s': round(module[best], 3),
        'module_elapsed_per_instance_ms': _ms(module[best] / count),
        'rounds': rounds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir')
    parser.add_argument('--rounds', type=int, default=40)
    parser.add_argument('--play-instances', type=int, default=20)
    parser.add_argument('--play-rounds', type=int, default=2)
    parser.add_argument('--output', default=os.path.join(REPO, 'bench', 'output', 'instance.json'),
                        help='where to write the JSON results')
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix='vmimage-bench-instance-', dir=args.workdir)
    try:
        store, digests = build_store(work)
        result = {'library': bench_library(store, args.rounds),
                  'module': bench_module(work, store, args.play_instances, args.play_rounds)}
        for label, size in SIZES:
            record = store.get_record(digests[label])
            result['library'][label]['image_virtual_size'] = record['virtual_size']
            result['library'][label]['image_allocated_size'] = record['allocated_size']
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lib = result['library']
    for label, _size in SIZES:
        print('create, %-5s image: median %7.2f ms  p90 %7.2f ms   (qemu-img create alone: %.2f ms; remove %.2f ms)'
              % (label, lib[label]['create']['median_ms'], lib[label]['create']['p90_ms'],
                 lib[label]['qemu_img_create']['median_ms'], lib[label]['remove']['median_ms']))
    print('ratio 50 GiB / 1 GiB (paired, median): %.3f' % lib['ratio_50GiB_over_1GiB'])
    mod = result['module']
    print('module: %d instances in one play: %.2f s wall (empty play %.2f s) -> %.0f ms per instance; '
          'module elapsed %.0f ms per instance; the same loop of ansible.builtin.ping: %.2f s (%.0f ms per item)'
          % (mod['instances'], mod['play_wall_s'], mod['empty_play_wall_s'], mod['per_instance_wall_ms'],
             mod['module_elapsed_per_instance_ms'], mod['ping_loop_wall_s'], mod['ping_per_item_wall_ms']))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, 'w') as f:
        json.dump(result, f, indent=2)
        f.write('\n')


if __name__ == '__main__':
    main()
