# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""docs/reference/ is what antsibull-docs generates from the collection as it
is now, antsibull-docs' linter accepts every plugin and role page, and the
changelog fragments pass antsibull-changelog's linters and render.

All of it is scripts/docs.sh --check, so CI and a developer run the same thing;
when this fails, ``bash scripts/docs.sh`` regenerates the reference."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_reference_is_current_and_linters_are_clean():
    proc = subprocess.run(['bash', os.path.join(REPO, 'scripts', 'docs.sh'), '--check'], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, 'scripts/docs.sh --check failed (rc %d):\n%s\n%s' % (
        proc.returncode, proc.stdout[-4000:], proc.stderr[-8000:])
    reference = os.path.join(REPO, 'docs', 'reference')
    pages = set(os.listdir(reference))
    # The check compares against a fresh run, so these only guard against a
    # generator that silently documents nothing.
    for name in os.listdir(os.path.join(REPO, 'plugins', 'modules')):
        if name.endswith('.py') and not name.startswith('_'):
            assert name[:-3] + '_module.rst' in pages
    roles = os.path.join(REPO, 'roles')
    for role in sorted(os.listdir(roles)) if os.path.isdir(roles) else []:
        if os.path.isfile(os.path.join(roles, role, 'meta', 'argument_specs.yml')):
            assert role + '_role.rst' in pages, 'role %s has argument_specs but no reference page' % role
