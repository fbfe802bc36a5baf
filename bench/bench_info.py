"""vm_image_info on a populated store: the in-process cost of the report, how
it scales with images and instances, and the module's task time against
ansible.builtin.stat.

    python bench/bench_info.py [--workdir DIR] [--rounds 5] [--play-rounds N] [--images 50] [--instances 200]

Why: vm_image_info is what users run to look at a hypervisor's cache (often
on every play), so its cost should stay close to ansible's own per-task cost
and grow linearly with the store, not with images x instances.

1. Setup (not timed): ``--images`` tiny images (a 1 MiB sparse disk.img with
   4 KiB of per-image data, so every image has its own digest; layer.qcow2
   from ``qemu-img create -f qcow2 -F raw -b disk.img``; machine.json
   ``{"version": 1}``), each packed with the library's archive writer and
   fetched into one store from a file:// URL under its own alias
   (img-000, img-001, ...).  Instances are created with InstanceManager,
   round-robin over the images.
2. In-process: vm_image_info's own main() (store only, no ``image``) with
   AnsibleModule replaced by a stand-in, so exactly the library calls the
   module makes in the checkout under test run (listing the images and
   describe() of each, the instance list and the owners of every disk from
   /proc, usage and the instance count), without ansible's argument parsing
   and JSON output.  Timed in total and per phase (describe, list,
   owners_of_all, usage: those methods are wrapped; 'other' is the rest),
   median of ``--rounds`` after one warm-up, at (images, instances) =
   (N, 0), (N, M), (N, 2M).  If describe() grows with the number of
   instances, the report is O(images x instances).  It runs in a child
   process (this script with --measure-store) so the peak RSS reported
   (resource.getrusage ru_maxrss; VmHWM in the JSON as a cross-check) is
   that of the imports and calls, not of the store build; /bin/sh forks that
   child, because Linux carries ru_maxrss across execve and a child exec'd
   from this process would start at this process's peak.
3. Module, at (N, M): ansible-playbook with one task on localhost
   (connection local, ansible_python_interpreter = this interpreter,
   ANSIBLE_COLLECTIONS_PATH at build/collections/ansible_collections/vmimage/qemu
   -> this checkout), vmimage.qemu.vm_image_info against the same play with
   one ansible.builtin.stat task (the store folder) as the reference,
   alternating A B A B ``--play-rounds`` times.  Task times are taken by the
   tests' recording callback (controller side, task start to result); the
   whole ansible-playbook wall time is reported too.  The module's result
   is checked against the in-process one (same digests, same instances).

Results are printed as a table and written as JSON to bench/output/info.json.
"""

import argparse
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MIB, REPO, ensure_collection_path, fmt_ratio, write_report  # noqa: E402

COLLECTIONS = ensure_collection_path()
sys.path.insert(0, os.path.join(REPO, 'tests'))


# ------------------------------------------------------------ library adapter
# module_utils moved from flat modules (store.py, instance.py, archive_writer.py,
# ImageStore.fetch) to subpackages (_store.store, _instance.instance,
# _archive.writer, maybe _ingest.pipeline.fetch_image).  Try the new layout
# first, then the old one.  Only a missing *layout* module falls back: an import
# error inside the new code is raised, not hidden.
_MU = 'ansible_collections.vmimage.qemu.plugins.module_utils'


def _new_or_none(module, attr):
    try:
        return getattr(importlib.import_module(_MU + module), attr)
    except ModuleNotFoundError as exc:
        if not exc.name or not (_MU + module).startswith(exc.name):
            raise
        return None


def _new_or_old(new, old, attr):
    found = _new_or_none(new, attr)
    return found if found is not None else getattr(importlib.import_module(_MU + old), attr)


ImageStore = _new_or_old('._store.store', '.store', 'ImageStore')
InstanceManager = _new_or_old('._instance.instance', '.instance', 'InstanceManager')
write_image_archive = _new_or_old('._archive.writer', '.archive_writer', 'write_image_archive')
_fetch_image = _new_or_none('._ingest.pipeline', 'fetch_image')


def fetch_image(store, url, alias):
    if _fetch_image is not None:
        return _fetch_image(store, url, alias=alias)
    return store.fetch(url, alias=alias)
# ------------------------------------------------------------ end of adapter


PHASES = ('describe', 'instance_list', 'owners', 'usage')


def _ms(seconds):
    return round(seconds * 1000, 2)


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _current_rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _vm_hwm_bytes():
    """The kernel's peak RSS of this process's memory map (cross-check of ru_maxrss)."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    return None


def _host_descriptors():
    """(processes, descriptors) visible in /proc: what every owners() call walks."""
    pids = [p for p in os.listdir('/proc') if p.isdigit()]
    fds = 0
    for pid in pids:
        try:
            fds += len(os.listdir('/proc/%s/fd' % pid))
        except OSError:
            pass
    return len(pids), fds


# ------------------------------------------------------------ store

def make_image_folder(folder, seed):
    """disk.img (1 MiB sparse, 4 KiB of data that differ per image),
    layer.qcow2 over it, machine.json."""
    os.makedirs(folder)
    disk = os.path.join(folder, 'disk.img')
    fd = os.open(disk, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, MIB)
        block = (b'vmimage bench_info image %06d\n' % seed) * 200
        os.pwrite(fd, block[:2048], 0)
        os.pwrite(fd, block[:2048], MIB // 2)
    finally:
        os.close(fd)
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', 'disk.img', 'layer.qcow2'],
                   cwd=folder, check=True, stdin=subprocess.DEVNULL)
    with open(os.path.join(folder, 'machine.json'), 'w') as f:
        json.dump({'version': 1}, f)


def alias_of(index):
    return 'img-%03d' % index


def build_images(work, store, count):
    for i in range(count):
        folder = os.path.join(work, 'src-%03d' % i)
        make_image_folder(folder, i)
        archive = os.path.join(work, 'img-%03d.tar.zst' % i)
        with open(archive, 'wb') as f:
            write_image_archive(folder, f)
        fetch_image(store, 'file://' + archive, alias=alias_of(i))
        shutil.rmtree(folder)
        os.unlink(archive)


def add_instances(store, start, stop, images):
    manager = InstanceManager(store)
    for k in range(start, stop):
        manager.ensure_present('vm-%04d' % k, alias_of(k % images))


# ------------------------------------------------------------ in-process (child)

class _ModuleDone(BaseException):
    """exit_json/fail_json of the stand-in (a BaseException, so the module's
    ``except Exception`` does not catch it)."""

    def __init__(self, result, failed):
        BaseException.__init__(self)
        self.result = result
        self.failed = failed


class _StandInModule(object):
    """Stands in for AnsibleModule, so vm_image_info's own main() runs
    unchanged (whatever library calls it makes in this tree) without ansible's
    argument parsing and JSON output."""

    args = {}

    def __init__(self, argument_spec=None, **_kwargs):
        self.params = dict((k, v.get('default')) for k, v in (argument_spec or {}).items())
        self.params.update(self.args)
        self.check_mode = False

    def exit_json(self, **result):
        raise _ModuleDone(result, False)

    def fail_json(self, **result):
        raise _ModuleDone(result, True)


def load_info_module(timers):
    """The vm_image_info module with the stand-in, and the methods whose time
    makes up the phases wrapped to add their seconds to ``timers``."""
    mod = importlib.import_module('ansible_collections.vmimage.qemu.plugins.modules.vm_image_info')
    mod.AnsibleModule = _StandInModule
    store_cls = getattr(mod, 'ImageStore', ImageStore)
    manager_cls = getattr(mod, 'InstanceManager', InstanceManager)
    for cls, method, phase in ((store_cls, 'describe', 'describe'), (manager_cls, 'list', 'instance_list'),
                               (manager_cls, 'owners_of_all', 'owners'), (store_cls, 'usage', 'usage')):
        original = getattr(cls, method)

        def timed(*args, _original=original, _phase=phase, **kwargs):
            t = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                timers[_phase] += time.perf_counter() - t
        setattr(cls, method, timed)
    return mod


def info_call(mod, timers, root):
    """vm_image_info's main() (store=root, no image): its result and the
    seconds of each phase ('other': the rest, e.g. listing the records)."""
    for phase in PHASES:
        timers[phase] = 0.0
    _StandInModule.args = {'store': root, 'image': None}
    t = time.perf_counter()
    finished = None
    try:
        mod.main()
    except _ModuleDone as done:
        finished = done
    total = time.perf_counter() - t
    if finished is None:
        raise AssertionError('vm_image_info main() returned without exit_json')
    if finished.failed:
        raise AssertionError('vm_image_info failed: %s' % finished.result.get('msg'))
    result = finished.result
    phases = dict(timers)
    phases['other'] = total - sum(timers.values())
    phases['total'] = total
    return result, phases


def measure_child(root, rounds):
    """Run in its own process: warm-up, then ``rounds`` timed calls."""
    timers = {}
    mod = load_info_module(timers)
    rss_before = _peak_rss_bytes()
    rss_now = _current_rss_bytes()
    procs, fds = _host_descriptors()
    result, _phases = info_call(mod, timers, root)  # warm-up
    samples = []
    for _round in range(rounds):
        samples.append(info_call(mod, timers, root)[1])
    print(json.dumps({
        'samples': samples, 'peak_rss_bytes': _peak_rss_bytes(), 'vm_hwm_bytes': _vm_hwm_bytes(),
        'rss_after_imports_bytes': rss_before,
        'rss_before_calls_bytes': rss_now, 'host_processes': procs, 'host_descriptors': fds,
        'digests': sorted(i['digest'] for i in result['images']),
        'instances': sorted(i['name'] for i in result['instances']),
        'per_image_instances': sorted(i['instances'] for i in result['images']),
        'usage': result['usage'],
    }))


def measure_in_process(root, rounds):
    # Through sh, which forks the child: Linux carries ru_maxrss across execve,
    # so a child exec'd straight from this process would report at least this
    # process's own peak (the store build), not that of the calls.
    argv = [sys.executable, os.path.abspath(__file__), '--measure-store', root, '--rounds', str(rounds)]
    proc = subprocess.run(['/bin/sh', '-c', '"$@"; exit $?', 'sh'] + argv, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, check=False)
    if proc.returncode != 0:
        raise SystemExit('in-process measurement failed:\n%s' % proc.stderr[-3000:])
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {}
    for key in PHASES + ('other', 'total'):
        values = [s[key] for s in doc['samples']]
        out[key + '_ms'] = _ms(statistics.median(values))
    out['total_min_ms'] = _ms(min(s['total'] for s in doc['samples']))
    out['total_max_ms'] = _ms(max(s['total'] for s in doc['samples']))
    out['peak_rss_mib'] = round(doc['peak_rss_bytes'] / MIB, 1)
    out['vm_hwm_mib'] = round(doc['vm_hwm_bytes'] / MIB, 1)
    out['peak_rss_after_imports_mib'] = round(doc['rss_after_imports_bytes'] / MIB, 1)
    out['rss_before_calls_mib'] = round(doc['rss_before_calls_bytes'] / MIB, 1)
    out['host_processes'] = doc['host_processes']
    out['host_descriptors'] = doc['host_descriptors']
    out['rounds'] = rounds
    return out, doc


# ------------------------------------------------------------ module

def bench_module(work, root, rounds):
    from support.ansible_run import run_playbook

    env = {'ANSIBLE_COLLECTIONS_PATH': COLLECTIONS}
    tasks = {
        'vm_image_info': {'name': 'info', 'vmimage.qemu.vm_image_info': {'store': root}},
        'stat': {'name': 'stat', 'ansible.builtin.stat': {'path': root}},
    }
    task_s = dict((k, []) for k in tasks)
    wall_s = dict((k, []) for k in tasks)
    last = None
    for _round in range(rounds):
        for label in ('vm_image_info', 'stat'):
            t = time.perf_counter()
            run = run_playbook([tasks[label]], work, env=env)
            wall_s[label].append(time.perf_counter() - t)
            task_s[label].append(run[0]['_task_seconds'])
            if label == 'vm_image_info':
                last = run[0]
    med = dict((k, statistics.median(v)) for k, v in task_s.items())
    wall = dict((k, statistics.median(v)) for k, v in wall_s.items())
    report = {
        'rounds': rounds,
        'info_task_s': round(med['vm_image_info'], 4), 'stat_task_s': round(med['stat'], 4),
        'task_ratio_median': round(med['vm_image_info'] / med['stat'], 2),
        'task_ratio_pairs': [round(a / b, 2) for a, b in zip(task_s['vm_image_info'], task_s['stat'])],
        'info_play_wall_s': round(wall['vm_image_info'], 3), 'stat_play_wall_s': round(wall['stat'], 3),
        'play_wall_ratio_median': round(wall['vm_image_info'] / wall['stat'], 2),
        'info_task_samples_s': [round(v, 4) for v in task_s['vm_image_info']],
        'stat_task_samples_s': [round(v, 4) for v in task_s['stat']],
    }
    return report, last


# ------------------------------------------------------------ main

def _check_collection_link():
    link = os.path.join(COLLECTIONS, 'ansible_collections', 'vmimage', 'qemu')
    if os.path.realpath(link) != os.path.realpath(REPO):
        raise SystemExit('%s points at %s, not at this checkout (%s): remove the link and re-run'
                         % (link, os.path.realpath(link), REPO))
    return link


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir')
    parser.add_argument('--rounds', type=int, default=5, help='in-process rounds per point (median)')
    parser.add_argument('--play-rounds', type=int, help='A B pairs of ansible-playbook runs (default: --rounds)')
    parser.add_argument('--images', type=int, default=50)
    parser.add_argument('--instances', type=int, default=200)
    parser.add_argument('--measure-store', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_store:
        measure_child(args.measure_store, args.rounds)
        return
    link = _check_collection_link()
    play_rounds = args.play_rounds or args.rounds
    n, m = args.images, args.instances
    work = tempfile.mkdtemp(prefix='vmimage-bench-info-', dir=args.workdir)
    try:
        root = os.path.join(work, 'store')
        store = ImageStore(root)
        t = time.perf_counter()
        build_images(work, store, n)
        build = {'images_s': round(time.perf_counter() - t, 2)}
        points = []
        module = None
        done = 0
        for count in (0, m, 2 * m):
            t = time.perf_counter()
            add_instances(store, done, count, n)
            build.setdefault('instances_s', 0)
            build['instances_s'] = round(build['instances_s'] + time.perf_counter() - t, 2)
            done = count
            point, doc = measure_in_process(root, args.rounds)
            assert len(doc['digests']) == n and len(doc['instances']) == count, (len(doc['digests']), count)
            assert sum(doc['per_image_instances']) == count and doc['usage']['instances'] == count, doc['usage']
            point.update(images=n, instances=count)
            points.append(point)
            if count == m:
                module, result = bench_module(work, root, play_rounds)
                same = (sorted(i['digest'] for i in result['images']) == doc['digests']
                        and sorted(i['name'] for i in result['instances']) == doc['instances']
                        and result['usage'] == doc['usage'] and result['changed'] is False)
                assert same, 'the module and the in-process calls disagree'
                module.update(images=n, instances=m, result_matches_in_process=same)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Scaling: cost per added instance of each phase, between the points.
    lo, mid, hi = points
    scaling = {}
    if m:
        for key in PHASES + ('other', 'total'):
            first = (mid[key + '_ms'] - lo[key + '_ms']) / m
            second = (hi[key + '_ms'] - mid[key + '_ms']) / m
            scaling[key + '_ms_per_instance'] = [round(first, 4), round(second, 4)]
        per_pair_us = (hi['describe_ms'] - lo['describe_ms']) / (2 * m) / n * 1000
        scaling['describe_us_per_image_x_instance'] = round(per_pair_us, 3)
        # O(images x instances): each added instance is read once per image, so it costs about
        # ``images`` times what describing one image costs.  O(images + instances): each added
        # instance is read about once, at most a few times the cost of describing one image.
        per_instance = (hi['describe_ms'] - lo['describe_ms']) / (2 * m)
        per_image = max(lo['describe_ms'] / n, 1e-6)
        scaling['describe_instance_to_image_cost'] = round(per_instance / per_image, 2)
        grows = per_instance > (n / 4.0) * per_image
        scaling['verdict'] = ('O(images x instances): each added instance costs about %d image descriptions'
                              % round(per_instance / per_image) if grows else
                              'O(images + instances): an added instance costs about %.1f image descriptions'
                              % (per_instance / per_image))
    report = {
        'collection': os.path.realpath(link), 'python': sys.executable, 'rounds': args.rounds,
        'proc_pids': len([p for p in os.listdir('/proc') if p.isdigit()]),
        'build': build, 'in_process': points, 'scaling': scaling, 'module': module,
    }

    print('vm_image_info main() in-process (AnsibleModule stubbed), median of %d rounds after a warm-up; '
          'collection %s' % (args.rounds, report['collection']))
    print('%7s %9s %9s %11s %8s %10s %9s %9s %9s %12s %9s' % (
        'images', 'instances', 'total ms', 'describe ms', 'list ms', 'owners ms', 'usage ms', 'other ms',
        'peak RSS', '(imports/now)', '/proc fds'))
    for p in points:
        print('%7d %9d %9.1f %11.1f %8.1f %10.1f %9.1f %9.1f %5.1f MiB %5.1f/%-5.1f %10d'
              % (p['images'], p['instances'], p['total_ms'], p['describe_ms'], p['instance_list_ms'],
                 p['owners_ms'], p['usage_ms'], p['other_ms'], p['peak_rss_mib'], p['peak_rss_after_imports_mib'],
                 p['rss_before_calls_mib'], p['host_descriptors']))
    if scaling:
        print('per added instance (0->%d, %d->%d): total %s ms, describe %s ms, owners %s ms; '
              'describe %.2f us per image x instance' % (
                  m, m, 2 * m, scaling['total_ms_per_instance'], scaling['describe_ms_per_instance'],
                  scaling['owners_ms_per_instance'], scaling['describe_us_per_image_x_instance']))
        print('scaling: ' + scaling['verdict'])
    print('module, %d images / %d instances, ansible-playbook with one task, median of %d A B rounds:'
          % (n, m, play_rounds))
    print('%-28s %10s %14s' % ('task', 'task s', 'play wall s'))
    print('%-28s %10.3f %14.3f' % ('vmimage.qemu.vm_image_info', module['info_task_s'], module['info_play_wall_s']))
    print('%-28s %10.3f %14.3f' % ('ansible.builtin.stat', module['stat_task_s'], module['stat_play_wall_s']))
    print('%-28s %10s %14s   pairs %s' % ('ratio', fmt_ratio(module['info_task_s'], module['stat_task_s']),
                                          fmt_ratio(module['info_play_wall_s'], module['stat_play_wall_s']),
                                          module['task_ratio_pairs']))
    print('setup (not timed): %d images in %.1f s, %d instances in %.1f s'
          % (n, build['images_s'], 2 * m, build['instances_s']))
    print('JSON: %s' % write_report('info', report))


if __name__ == '__main__':
    main()
