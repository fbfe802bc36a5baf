"""Shared helpers for the benchmarks: test disk generation, timing of child
processes with their peak RSS (wait4), alternating A/B runs, and ratios.

Each measured tool runs as its own process so its peak RSS is its own and the
page-cache/memory state is shared fairly between the alternating runs.
"""

import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS = os.path.join(REPO, 'build', 'collections')
GIB = 1024 ** 3
MIB = 1024 ** 2


def ensure_collection_path():
    link = os.path.join(COLLECTIONS, 'ansible_collections', 'vmimage', 'qemu')
    if not os.path.islink(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(REPO, link)
    if COLLECTIONS not in sys.path:
        sys.path.insert(0, COLLECTIONS)
    return COLLECTIONS


def make_test_disk(path, apparent=8 * GIB, data=1 * GIB, extents=1700, seed=1):
    """Sparse disk with ``data`` bytes in ``extents`` scattered extents:
    one third random (incompressible), two thirds compressible text-like."""
    rng = random.Random(seed)
    avg = data // extents
    block = 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, apparent)
        slot = apparent // extents
        words = [bytes(rng.choice(b'abcdefghijklmnopqrstuvwxyz ') for _letter in range(rng.randint(2, 12)))
                 for _word in range(512)]
        text = b' '.join(rng.choice(words) for _word in range(400000))[:8 * MIB]
        written = 0
        for i in range(extents):
            length = max(block, (int(avg * rng.uniform(0.5, 1.5)) // block) * block)
            length = min(length, data - written) if i == extents - 1 else length
            if length <= 0:
                break
            start = i * slot + (rng.randrange(0, max(1, slot - length)) // block) * block
            pos = 0
            while pos < length:
                n = min(length - pos, 4 * MIB)
                if i % 3 == 0:
                    chunk = os.urandom(n)
                else:
                    off = rng.randrange(0, len(text) - n) if len(text) > n else 0
                    chunk = text[off:off + n]
                os.pwrite(fd, chunk, start + pos)
                pos += n
            written += length
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def run_timed(argv_list, cwd=None, stdin_path=None, stdout_path=None):
    """Run a pipeline of argv lists (no shell); return (seconds, max peak RSS in
    bytes among its processes, sum of RSS)."""
    start = time.monotonic()
    procs = []
    prev = open(stdin_path, 'rb') if stdin_path else subprocess.DEVNULL
    out_file = open(stdout_path, 'wb') if stdout_path else None
    try:
        for i, argv in enumerate(argv_list):
            last = i == len(argv_list) - 1
            stdout = (out_file or subprocess.DEVNULL) if last else subprocess.PIPE
            p = subprocess.Popen(argv, cwd=cwd, stdin=prev, stdout=stdout)
            if hasattr(prev, 'close') and prev is not subprocess.DEVNULL:
                prev.close()
            prev = p.stdout
            procs.append(p)
        peaks = []
        for p in procs:
            _pid, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            peaks.append(usage.ru_maxrss * 1024)
            if p.returncode != 0:
                raise RuntimeError('%s exited with %s' % (p.args, p.returncode))
    finally:
        if out_file:
            out_file.close()
    return time.monotonic() - start, max(peaks), sum(peaks)


def drop_caches_if_possible():
    """Best effort: fairness between runs matters more than a cold cache."""
    try:
        os.sync()
    except Exception:
        pass


def alternate(label_a, run_a, label_b, run_b, rounds=2):
    """A B A B ...: returns dict label -> list of (seconds, peak_rss)."""
    results = {label_a: [], label_b: []}
    for _round in range(rounds):
        for label, run in ((label_a, run_a), (label_b, run_b)):
            drop_caches_if_possible()
            results[label].append(run())
    return results


def fmt_ratio(ours, ref):
    return '%.2fx' % (ours / ref) if ref else 'n/a'


def write_report(name, report):
    """Save a benchmark's figures as bench/output/<name>.json (git-ignored)."""
    out_dir = os.path.join(REPO, 'bench', 'output')
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name + '.json')
    with open(path, 'w') as f:
        json.dump(report, f, indent=2)
    return path
