"""Fetching an image from a loopback HTTP server, against the reference pipelines.

    python bench/bench_fetch.py [--apparent-gib 8] [--data-gib 1] [--rounds 2]

Serves the generated image (default 8 GiB apparent / 1 GiB data) on
127.0.0.1 and times, alternating:
  ours:      the library's ImageStore.fetch into an empty store (download,
             sha256, decompress, extract, validate incl. qemu-img, fsync, commit)
  curl:      curl -s URL | zstd -dc | tar -S -xf -
  ansible:   ansible.builtin.get_url + ansible.builtin.unarchive (one play)
and, in one play, an idempotent re-run of vmimage.qemu.vm_image_fetch next to
an ansible.builtin.stat task (controller-side task times).  Prints ratios and
peak RSS; JSON in bench/output/fetch.json.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GIB, MIB, REPO, ensure_collection_path, run_timed, write_report  # noqa: E402

COLLECTIONS = ensure_collection_path()
sys.path.insert(0, os.path.join(REPO, 'tests'))
from support.ansible_run import run_playbook  # noqa: E402
from support.http_server import LocalHTTPServer  # noqa: E402
from bench_archive import build_source  # noqa: E402

FETCH = '''
import sys
sys.path.insert(0, sys.argv[1])
from ansible_collections.vmimage.qemu.plugins.module_utils._ingest.pipeline import fetch_image
from ansible_collections.vmimage.qemu.plugins.module_utils._store.store import ImageStore
fetch_image(ImageStore(sys.argv[2]), sys.argv[3], alias='bench')
'''


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir')
    parser.add_argument('--apparent-gib', type=float, default=8)
    parser.add_argument('--data-gib', type=float, default=1)
    parser.add_argument('--rounds', type=int, default=2)
    args = parser.parse_args()
    os.environ['ANSIBLE_COLLECTIONS_PATH'] = COLLECTIONS
    work = tempfile.mkdtemp(prefix='vmimage-bench-fetch-', dir=args.workdir)
    try:
        src = os.path.join(work, 'src')
        data = build_source(src, int(args.apparent_gib * GIB), int(args.data_gib * GIB))
        archive = os.path.join(work, 'image.tar.zst')
        subprocess.run([sys.executable, os.path.join(REPO, 'bench', 'ours.py'), 'pack', src, archive], check=True)
        shutil.rmtree(src)
        times = {'ours': [], 'curl': [], 'ansible': []}
        with LocalHTTPServer() as server:
            url = server.add('/image.tar.zst', file=archive)

            def ours():
                store = os.path.join(work, 'store')
                shutil.rmtree(store, ignore_errors=True)
                return run_timed([[sys.executable, '-c', FETCH, COLLECTIONS, store, url]])

            def curl():
                dest = os.path.join(work, 'x-curl')
                shutil.rmtree(dest, ignore_errors=True)
                os.makedirs(dest)
                return run_timed([['curl', '-sSf', url], ['zstd', '-q', '-dc'], ['tar', '-S', '-C', dest, '-xf', '-']])

            def ansible():
                dest = os.path.join(work, 'x-ansible')
                shutil.rmtree(dest, ignore_errors=True)
                os.makedirs(dest)
                run = run_playbook([
                    {'ansible.builtin.get_url': {'url': url, 'dest': os.path.join(work, 'dl.tar.zst')}},
                    {'ansible.builtin.unarchive': {'src': os.path.join(work, 'dl.tar.zst'), 'dest': dest,
                                                   'remote_src': True}},
                ], work)
                os.unlink(os.path.join(work, 'dl.tar.zst'))
                return (sum(r['_task_seconds'] for r in run.results), 0, 0)

            for _round in range(args.rounds):
                for name, fn in (('ours', ours), ('curl', curl), ('ansible', ansible)):
                    times[name].append(fn())
            # Idempotent re-run next to a stat task, same play, store populated by ours().
            store = os.path.join(work, 'store')
            rerun = run_playbook([
                {'vmimage.qemu.vm_image_fetch': {'url': url, 'image_id': 'bench', 'store': store}},
                {'ansible.builtin.stat': {'path': archive}},
                {'vmimage.qemu.vm_image_fetch': {'url': url, 'image_id': 'bench', 'store': store}},
                {'ansible.builtin.stat': {'path': archive}},
            ], work)
            assert not rerun[0]['changed'] and not rerun[0]['downloaded']
        fetch_s = statistics.median([rerun[0]['_task_seconds'], rerun[2]['_task_seconds']])
        stat_s = statistics.median([rerun[1]['_task_seconds'], rerun[3]['_task_seconds']])
        med = dict((k, statistics.median(t[0] for t in v)) for k, v in times.items())
        report = {
            'data_bytes': data, 'archive_bytes': os.path.getsize(archive), 'rounds': args.rounds,
            'seconds': med, 'ratio_vs_curl': round(med['ours'] / med['curl'], 3),
            'speedup_vs_get_url_unarchive': round(med['ansible'] / med['ours'], 2),
            'ours_peak_rss_mib': round(max(t[1] for t in times['ours']) / MIB, 1),
            'idempotent_fetch_task_s': round(fetch_s, 3), 'stat_task_s': round(stat_s, 3),
            'idempotent_vs_stat': round(fetch_s / stat_s, 2),
        }
        print('fetch %.0f MiB data (%.0f MiB archive): ours %.2f s (peak RSS %.0f MiB), curl|zstd|tar %.2f s, '
              'get_url+unarchive %.2f s' % (data / MIB, report['archive_bytes'] / MIB, med['ours'],
                                            report['ours_peak_rss_mib'], med['curl'], med['ansible']))
        print('ratio vs curl pipeline %.2fx; %.1fx faster than get_url+unarchive; idempotent re-run %.3f s '
              'vs stat %.3f s (%.2fx)' % (report['ratio_vs_curl'], report['speedup_vs_get_url_unarchive'],
                                          fetch_s, stat_s, report['idempotent_vs_stat']))
        write_report('fetch', report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
