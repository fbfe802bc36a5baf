"""Pack and unpack throughput of the image archive against GNU tar + zstd.

    python bench/bench_archive.py [--workdir DIR] [--apparent-gib 8] [--data-gib 1] [--rounds 2]

Generates a sparse disk (default 8 GiB apparent, 1 GiB of data in ~1700
scattered extents, two thirds compressible), then times in alternating runs:
  pack:   ours  vs  tar -S -cf - ... | zstd -T0 -3
  unpack: ours  vs  zstd -dc ... | tar -S -xf -     (both on the tar+zstd archive)
and prints median wall times, ratios (ours / reference), MB/s of real data
and peak RSS.  Results are also written as JSON to bench/output/archive.json.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GIB, MIB, REPO, alternate, fmt_ratio, make_test_disk, run_timed, write_report  # noqa: E402

MEMBERS = ['disk.img', 'layer.qcow2', 'machine.json']


def build_source(folder, apparent, data):
    os.makedirs(folder)
    written = make_test_disk(os.path.join(folder, 'disk.img'), apparent, data)
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-o',
                    'backing_file=disk.img,backing_fmt=raw,lazy_refcounts=on', 'layer.qcow2'],
                   cwd=folder, check=True)
    with open(os.path.join(folder, 'machine.json'), 'w') as f:
        f.write('{"version": 1}\n')
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir')
    parser.add_argument('--apparent-gib', type=float, default=8)
    parser.add_argument('--data-gib', type=float, default=1)
    parser.add_argument('--rounds', type=int, default=2)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix='vmimage-bench-', dir=args.workdir)
    py = sys.executable
    ours = os.path.join(REPO, 'bench', 'ours.py')
    try:
        src = os.path.join(work, 'src')
        data = build_source(src, int(args.apparent_gib * GIB), int(args.data_gib * GIB))
        ref_archive = os.path.join(work, 'ref.tar.zst')
        our_archive = os.path.join(work, 'ours.tar.zst')

        def pack_ref():
            return run_timed([['tar', '-S', '-C', src, '-cf', '-'] + MEMBERS, ['zstd', '-q', '-T0', '-3']],
                             stdout_path=ref_archive)

        def pack_ours():
            return run_timed([[py, ours, 'pack', src, our_archive]])

        def fresh(name):
            path = os.path.join(work, name)
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
            return path

        def unpack_ref():
            dest = fresh('x-ref')
            result = run_timed([['zstd', '-q', '-dc', ref_archive], ['tar', '-S', '-C', dest, '-xf', '-']])
            shutil.rmtree(dest)
            return result

        def unpack_ours():
            dest = fresh('x-ours')
            result = run_timed([[py, ours, 'unpack', ref_archive, dest]])
            shutil.rmtree(dest)
            return result

        packs = alternate('ours', pack_ours, 'ref', pack_ref, args.rounds)
        unpacks = alternate('ours', unpack_ours, 'ref', unpack_ref, args.rounds)

        def summary(results):
            t_ours = statistics.median(r[0] for r in results['ours'])
            t_ref = statistics.median(r[0] for r in results['ref'])
            pairs = [o[0] / r[0] for o, r in zip(results['ours'], results['ref'])]
            return {
                'ours_s': round(t_ours, 3), 'ref_s': round(t_ref, 3),
                'ratio_median': round(t_ours / t_ref, 3),
                'ratio_pairs': [round(p, 3) for p in pairs],
                'ours_mb_s': round(data / MIB / t_ours, 1), 'ref_mb_s': round(data / MIB / t_ref, 1),
                'ours_peak_rss_mib': round(max(r[1] for r in results['ours']) / MIB, 1),
                'ref_peak_rss_mib': round(max(r[1] for r in results['ref']) / MIB, 1),
            }

        report = {
            'apparent_bytes': int(args.apparent_gib * GIB), 'data_bytes': data,
            'ours_archive_bytes': os.path.getsize(our_archive), 'ref_archive_bytes': os.path.getsize(ref_archive),
            'pack': summary(packs), 'unpack': summary(unpacks), 'rounds': args.rounds,
        }
        print('disk: %.1f GiB apparent, %.0f MiB data; archives: ours %.0f MiB, tar+zstd %.0f MiB'
              % (args.apparent_gib, data / MIB, report['ours_archive_bytes'] / MIB, report['ref_archive_bytes'] / MIB))
        for what, s in (('pack', report['pack']), ('unpack', report['unpack'])):
            print('%-6s ours %6.2f s (%6.1f MB/s, peak RSS %5.1f MiB)  ref %6.2f s (%6.1f MB/s)  ratio %s  pairs %s'
                  % (what, s['ours_s'], s['ours_mb_s'], s['ours_peak_rss_mib'], s['ref_s'], s['ref_mb_s'],
                     fmt_ratio(s['ours_s'], s['ref_s']), s['ratio_pairs']))
        write_report('archive', report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
