"""The demo: build an image, serve it on 127.0.0.1, fetch it with the
collection into a store in a temporary folder, and print the result.

Run through scripts/demo.sh (which sets up the machine first).  Everything it
starts is stopped and everything it creates is removed before it exits.
"""

import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))
sys.path.insert(0, os.path.join(REPO, 'bench'))

from common import ensure_collection_path  # noqa: E402

COLLECTIONS = ensure_collection_path()

from support.http_server import LocalHTTPServer  # noqa: E402
from support.image_factory import make_image_folder, pattern  # noqa: E402

from ansible_collections.vmimage.qemu.plugins.module_utils.archive_writer import write_image_archive  # noqa: E402


def main():
    work = tempfile.mkdtemp(prefix='vmimage-demo-')
    try:
        disk_size = 256 * 1024 * 1024
        folder = make_image_folder(os.path.join(work, 'image'), disk_size=disk_size,
                                   chunks=[(0, pattern(65536, 1)), (disk_size // 3, pattern(1 << 20, 2)),
                                           (disk_size - 4096, pattern(4096, 3))],
                                   machine={'version': 1, 'memory': 512, 'network': 'e1000'})
        archive = os.path.join(work, 'image.tar.zst')
        with open(archive, 'wb') as out:
            packed = write_image_archive(folder, out)
        print('packed %s: %d MiB disk, %d KiB of data -> %d KiB archive, %s'
              % (archive, disk_size >> 20, packed.data_bytes >> 10, packed.archive_size >> 10, packed.digest))
        store = os.path.join(work, 'store')
        with LocalHTTPServer() as server:
            url = server.add('/images/demo/image.tar.zst', file=archive)
            print('serving %s' % url)
            env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_NOCOLOR='1',
                       ANSIBLE_RETRY_FILES_ENABLED='0', ANSIBLE_LOCALHOST_WARNING='0',
                       ANSIBLE_INVENTORY_UNPARSED_WARNING='0')
            playbook = os.path.join(os.path.dirname(sys.executable), 'ansible-playbook')
            cmd = [playbook, '-i', 'localhost,', os.path.join(REPO, 'demo', 'fetch.yml'),
                   '-e', 'demo_python=%s' % sys.executable, '-e', 'demo_url=%s' % url,
                   '-e', 'demo_checksum=%s' % packed.digest, '-e', 'demo_store=%s' % store]
            rc = subprocess.call(cmd, env=env)
            bodies = [r for r in server.requests if r.method == 'GET']
            print('the server saw %d download(s)' % len(bodies))
        if rc != 0:
            sys.exit(rc)
        print('demo OK: store in %s (removed now)' % store)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
