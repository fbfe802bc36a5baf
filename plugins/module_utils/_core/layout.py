# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""The names the collection puts on disk, in one place.

Image members are the archive format's; everything under a store root is
derived here (digests, sha256 of names), never taken from input.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import time

# The image archive's members (docs/image-format.md), in archive order.
DISK = 'disk.img'
LAYER = 'layer.qcow2'
MACHINE = 'machine.json'
MEMBER_NAMES = (DISK, LAYER, MACHINE)

DEFAULT_STORE = '/var/lib/vm-images'

# The store's folders and files.
STORE_MARKER = 'store.json'       # {"format": N}: written last when a store is made or upgraded
STORE_LOCK = '.lock'
IMAGES = 'images'
ALIASES = 'aliases'
REFS = 'refs'
STAGING = 'staging'
LOCKS = 'locks'
INSTANCES = 'instances'
IMAGE_RECORD = 'image.json'
INSTANCE_RECORD = 'instance.json'
# WorkArea prefix in folders the collection shares with the user (a mutable
# image's parent, a pack's destination folder): only names starting with it
# are ever collected there.
WORK_PREFIX = '.vmimage-work-'


def key_name(text):
    """A file name derived from any string: its sha256."""
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


def now():
    """The timestamp records carry (UTC, seconds)."""
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
