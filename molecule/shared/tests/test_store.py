# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The store the image_cache role made: folder, cached images, removed image."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re

from conftest import IMAGES, RUN, archive_digest, image_by_alias, served_file

# A 1 GiB disk holding one boot sector: anything near its apparent size means
# the store wrote the holes out.
SPARSE_FACTOR = 64


def _present(settings):
    return [i for i in settings['image_cache_images'] if i.get('state', 'present') == 'present']


def _absent(settings):
    return [i for i in settings['image_cache_images'] if i.get('state', 'present') == 'absent']


def test_store_folder_owner_group_mode(host, settings):
    store = host.file(settings['image_cache_store'])
    assert store.is_directory
    assert not store.is_symlink
    assert store.user == settings['image_cache_owner']
    assert store.group == settings['image_cache_group']
    assert store.mode == int(settings['image_cache_mode'], 8), oct(store.mode)


def test_scenario_asks_for_both_kinds_of_entry(settings):
    # Guards the checks below against passing on an empty list.
    assert _present(settings) and _absent(settings)


def test_present_images_are_the_served_archives(settings, store_info):
    for entry in _present(settings):
        image = image_by_alias(store_info, entry['image_id'])
        assert image is not None, '%s not in the store: %s' % (entry['image_id'], store_info['images'])
        assert image['digest'] == archive_digest(served_file(entry['url']))
        assert image['source'] == entry['url']


def test_present_images_have_sparse_disks(host, settings, store_info):
    for entry in _present(settings):
        image = image_by_alias(store_info, entry['image_id'])
        disk = os.path.join(settings['image_cache_store'], 'images', image['digest'].split(':', 1)[1], 'disk.img')
        f = host.file(disk)
        assert f.is_file and not f.is_symlink
        blocks, block_size = host.check_output('stat -c %s -- %s', '%b %B', disk).split()
        allocated = int(blocks) * int(block_size)
        assert f.size == image['virtual_size'] == 1 << 30
        assert allocated * SPARSE_FACTOR < f.size, 'disk.img allocates %d of %d bytes' % (allocated, f.size)
        # The cached files are shared by every instance: nobody may write them.
        assert not f.mode & 0o222, oct(f.mode)


def test_absent_image_was_fetched_then_removed(host, settings, store_info):
    retired = os.path.join(IMAGES, 'retired', 'image.tar.zst')
    digest = archive_digest(retired)
    boot = archive_digest(os.path.join(IMAGES, 'boot', 'image.tar.zst'))
    assert digest != boot  # otherwise removing it could not remove an image
    # converge's seed task downloaded it, so the role removed a real image ...
    with open(os.path.join(RUN, 'http.log')) as log:
        assert re.search(r'"GET /retired/image\.tar\.zst HTTP/1\.1" 200', log.read())
    # ... and nothing of it is left.
    for entry in _absent(settings):
        assert image_by_alias(store_info, entry['image_id']) is None
    assert digest not in [image['digest'] for image in store_info['images']]
    assert not host.file(os.path.join(settings['image_cache_store'], 'images', digest.split(':', 1)[1])).exists


def test_store_usage_counts_only_the_present_images(settings, store_info):
    assert store_info['usage']['images'] == len(_present(settings))
    assert store_info['usage']['allocated_size'] * SPARSE_FACTOR < store_info['usage']['virtual_size']


def test_no_staging_leftovers(host, settings):
    staging = os.path.join(settings['image_cache_store'], 'staging')
    if host.file(staging).exists:
        assert host.check_output('find %s -mindepth 1 -maxdepth 1', staging) == ''
