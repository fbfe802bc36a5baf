"""Cost of an idempotent vm_image_package re-run, against ansible.builtin.stat.

    python bench/bench_package.py [--workdir DIR] [--apparent-gib 8] [--data-gib 1] [--pairs 8] [--output FILE]

Builds a mutable image folder whose disk.img is the benchmark disk (default
8 GiB apparent, 1 GiB of data in ~1700 scattered extents), packs it once with
vm_image_package (timed, for reference), then runs ONE play that alternates

    ansible.builtin.stat  (of disk.img; get_checksum/get_mime/get_attributes off: the cheapest stat)
    vmimage.qemu.vm_image_package  (path + dest: the archive is up to date)

``--pairs`` times, and reports the median task times and their ratio (target:
at most 1.5).  Both run through the same connection, fork and AnsiballZ
path; each task is timed by a small callback plugin (written to the work
folder) from task start to its result.  Every re-run must report
changed=false and packed=false: no compression and no read of the disk.
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
from common import GIB, MIB, ensure_collection_path, make_test_disk  # noqa: E402

CALLBACK = '''
from __future__ import absolute_import, division, print_function
__metaclass__ = type
import json
import time
from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = 'stdout'
    CALLBACK_NAME = 'task_timer'

    def __init__(self):
        super(CallbackModule, self).__init__()
        self.tasks = []
        self.started = None

    def v2_playbook_on_task_start(self, task, is_conditional):
        self.started = time.monotonic()
        self.tasks.append({'name': task.get_name(), 'action': task.action})

    def _done(self, result, failed=False):
        entry = self.tasks[-1]
        entry['seconds'] = time.monotonic() - self.started
        entry['failed'] = failed
        entry['result'] = dict(result._result)

    def v2_runner_on_ok(self, result, **kwargs):
        self._done(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._done(result, failed=True)

    def v2_playbook_on_stats(self, stats):
        self._display.display(json.dumps(self.tasks, default=str))
'''


def write_machine(folder):
    ensure_collection_path()
    from ansible_collections.vmimage.qemu.plugins.module_utils._formats.machine import dump_machine_json
    from ansible_collections.vmimage.qemu.plugins.module_utils._mutable.mutable_image import blank_machine
    with open(os.path.join(folder, 'machine.json'), 'wb') as f:
        f.write(dump_machine_json(blank_machine({'memory': 2048})))


def run_play(work, tasks, name):
    inventory = os.path.join(work, 'inventory.ini')
    with open(inventory, 'w') as f:
        f.write('localhost ansible_connection=local ansible_python_interpreter=%s\n' % sys.executable)
    playbook = os.path.join(work, name + '.yml')
    with open(playbook, 'w') as f:
        json.dump([{'hosts': 'localhost', 'gather_facts': False, 'tasks': tasks}], f, indent=1)
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK='task_timer', ANSIBLE_CALLBACK_PLUGINS=os.path.join(work, 'cb'),
               ANSIBLE_COLLECTIONS_PATH=ensure_collection_path(), ANSIBLE_NOCOLOR='1',
               ANSIBLE_RETRY_FILES_ENABLED='0', ANSIBLE_LOCALHOST_WARNING='0', ANSIBLE_DEPRECATION_WARNINGS='0',
               ANSIBLE_LOCAL_TEMP=os.path.join(work, 'ansible-tmp'))
    argv = [os.path.join(os.path.dirname(sys.executable), 'ansible-playbook'), '-i', inventory, playbook]
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          check=False)
    out = proc.stdout
    try:
        tasks = json.loads(out[out.index('['):])
    except ValueError:
        raise SystemExit('ansible-playbook failed (rc %d):\n%s\n%s' % (proc.returncode, out[-3000:],
                                                                       proc.stderr[-3000:]))
    for task in tasks:
        if task.get('failed'):
            raise SystemExit('task %s failed: %s' % (task['name'], task['result'].get('msg')))
    return tasks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir')
    parser.add_argument('--apparent-gib', type=float, default=8)
    parser.add_argument('--data-gib', type=float, default=1)
    parser.add_argument('--pairs', type=int, default=8)
    parser.add_argument('--output', help='also write the report as JSON to this file')
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix='vmimage-bench-package-', dir=args.workdir)
    try:
        os.makedirs(os.path.join(work, 'cb'))
        with open(os.path.join(work, 'cb', 'task_timer.py'), 'w') as f:
            f.write(CALLBACK)
        image = os.path.join(work, 'image')
        os.makedirs(image)
        data = make_test_disk(os.path.join(image, 'disk.img'), int(args.apparent_gib * GIB),
                              int(args.data_gib * GIB))
        write_machine(image)
        dest = os.path.join(work, 'image.tar.zst')
        pkg = {'vmimage.qemu.vm_image_package': {'path': image, 'dest': dest}}
        stat = {'ansible.builtin.stat': {'path': os.path.join(image, 'disk.img'), 'get_checksum': False,
                                         'get_mime': False, 'get_attributes': False}}

        time.sleep(0.1)  # past the timestamp granularity, so the first pack's fingerprint is trusted
        first = run_play(work, [dict(pkg, name='first pack')], 'first')[0]
        assert first['result']['changed'] and first['result']['packed'], first['result']
        tasks = []
        for i in range(args.pairs):
            tasks.append(dict(stat, name='stat %d' % i))
            tasks.append(dict(pkg, name='package %d' % i))
        timed = run_play(work, tasks, 'rerun')
        stats = [t['seconds'] for t in timed if t['name'].startswith('stat')]
        packs = [t for t in timed if t['name'].startswith('package')]
        for t in packs:
            r = t['result']
            assert r['changed'] is False and r['packed'] is False and r['digest'] == first['result']['digest'], r
        pack_s = [t['seconds'] for t in packs]
        module_s = [t['result']['elapsed'] for t in packs]
        stat_med, pack_med = statistics.median(stats), statistics.median(pack_s)
        report = {
            'apparent_bytes': int(args.apparent_gib * GIB), 'data_bytes': data,
            'archive_bytes': os.path.getsize(dest),
            'first_pack_s': round(first['seconds'], 3), 'first_pack_module_s': first['result']['elapsed'],
            'stat_task_s': round(stat_med, 4), 'package_rerun_task_s': round(pack_med, 4),
            'package_rerun_module_s': round(statistics.median(module_s), 4),
            'ratio_median': round(pack_med / stat_med, 3),
            'ratio_pairs': [round(p / s, 3) for s, p in zip(stats, pack_s)],
            'pairs': args.pairs,
        }
        print('disk: %.1f GiB apparent, %.0f MiB data; archive %.0f MiB; first pack %.2f s (module %.2f s)'
              % (args.apparent_gib, data / MIB, report['archive_bytes'] / MIB, first['seconds'],
                 first['result']['elapsed']))
        print('idempotent re-run: vm_image_package %.3f s (module itself %.4f s), ansible.builtin.stat %.3f s, '
              'ratio %.2fx (target <= 1.5x), pairs %s'
              % (pack_med, report['package_rerun_module_s'], stat_med, report['ratio_median'],
                 report['ratio_pairs']))
        if args.output:
            with open(args.output, 'w') as f:
                json.dump(report, f, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
