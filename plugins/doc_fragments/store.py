# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):

    DOCUMENTATION = r'''
options:
  store:
    description:
      - Folder of the image store on the target host.
      - Created on first use with mode C(0700) when missing; an existing folder keeps its owner and mode
        (the C(vmimage.qemu.image_cache) role sets them).
      - Every process on the host that uses the same store shares its images and its locks.
    type: path
    default: /var/lib/vm-images
'''
