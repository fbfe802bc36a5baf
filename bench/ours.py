"""Command-line entry to the library for the benchmarks (one process per run,
so wait4 reports this run's own peak RSS)."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ensure_collection_path  # noqa: E402

ensure_collection_path()

from ansible_collections.vmimage.qemu.plugins.module_utils._archive.reader import extract_image_archive  # noqa: E402
from ansible_collections.vmimage.qemu.plugins.module_utils._archive.writer import write_image_archive  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('pack')
    p.add_argument('folder')
    p.add_argument('archive')
    p.add_argument('--level', type=int, default=3)
    p.add_argument('--threads', type=int, default=0)
    u = sub.add_parser('unpack')
    u.add_argument('archive')
    u.add_argument('folder')
    args = parser.parse_args()
    if args.cmd == 'pack':
        with open(args.archive, 'wb') as out:
            write_image_archive(args.folder, out, level=args.level, threads=args.threads)
    else:
        os.makedirs(args.folder, exist_ok=True)
        with open(args.archive, 'rb') as src:
            extract_image_archive(src, args.folder)


if __name__ == '__main__':
    main()
