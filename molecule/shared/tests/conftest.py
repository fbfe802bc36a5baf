# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures of the testinfra checks every scenario runs after converge.

Molecule runs pytest on the controller with ``--connection=ansible
--ansible-inventory=<the scenario's inventory>``; ``host`` is the target.
What the roles were asked to do is read back from that inventory through
ansible itself (the same templating converge used), and the archives the
target downloaded are read on the controller, where create built them.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import os
from urllib.parse import urlsplit

import pytest

RUN = os.path.join(os.environ['MOLECULE_EPHEMERAL_DIRECTORY'], 'run')
REPO = os.environ['MOLECULE_PROJECT_DIRECTORY']
IMAGES = os.path.join(RUN, 'images')

SETTINGS = ('image_cache_store', 'image_cache_owner', 'image_cache_group', 'image_cache_mode',
            'image_cache_images', 'vmimage_molecule_run')


def ansible_args(**kw):
    """Module arguments for host.ansible: JSON, so no value is ever split or
    re-quoted by ansible's key=value parser."""
    return json.dumps(kw)


def archive_digest(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return 'sha256:' + h.hexdigest()


def served_file(url):
    """The controller-side file behind a URL of the scenario's image server."""
    parts = [p for p in urlsplit(url).path.split('/') if p]
    assert parts and '..' not in parts, url
    return os.path.join(IMAGES, *parts)


@pytest.fixture(scope='module')
def settings(host):
    """The role variables converge used, templated by ansible for this host."""
    expression = '{{ dict(%s) }}' % ', '.join('%s=%s' % (name, name) for name in SETTINGS)
    return host.ansible('ansible.builtin.debug', ansible_args(msg=expression))['msg']


@pytest.fixture(scope='module')
def store_info(host, settings):
    """vm_image_info on the target (read-only, so check mode is fine)."""
    return host.ansible('vmimage.qemu.vm_image_info', ansible_args(store=settings['image_cache_store']))


def image_by_alias(info, alias):
    found = [image for image in info['images'] if alias in image['aliases']]
    assert len(found) <= 1, found
    return found[0] if found else None
