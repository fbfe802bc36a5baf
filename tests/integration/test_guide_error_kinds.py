# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""docs/guide.md documents every ``error_kind`` the modules can return, and
only those, and its links lead somewhere.

The kinds are read from the source: every ``kind = '...'`` class attribute in
plugins/ (the VmImageError hierarchy, wherever a subclass lives) and every
literal ``error_kind='...'`` / ``['error_kind'] = '...'`` a module or helper
sets.  The guide has one ``#### `kind``` heading per kind under
"### Error kinds", each with an example message in a code block."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ast
import glob
import inspect
import os
import re

from ansible_collections.vmimage.qemu.plugins.module_utils._core import errors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUIDE = os.path.join(REPO, 'docs', 'guide.md')


def _string(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def library_kinds():
    """{kind: [where it is set]} for every error kind in plugins/."""
    found = {}
    for path in sorted(glob.glob(os.path.join(REPO, 'plugins', '**', '*.py'), recursive=True)):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        where = os.path.relpath(path, REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and _string(stmt.value) is not None and any(
                            isinstance(t, ast.Name) and t.id == 'kind' for t in stmt.targets):
                        found.setdefault(_string(stmt.value), []).append('%s:%s' % (where, node.name))
            elif isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == 'error_kind' and _string(keyword.value) is not None:
                        found.setdefault(_string(keyword.value), []).append('%s:%d' % (where, node.lineno))
            elif isinstance(node, ast.Assign) and _string(node.value) is not None:
                for target in node.targets:
                    if isinstance(target, ast.Subscript) and _string(getattr(target, 'slice', None)) == 'error_kind':
                        found.setdefault(_string(node.value), []).append('%s:%d' % (where, node.lineno))
    return found


def guide_sections():
    """{kind: section text} of the '#### `kind`' headings under '### Error kinds'."""
    with open(GUIDE) as f:
        text = f.read()
    start = re.search(r'^### Error kinds\s*$', text, re.M)
    assert start, 'docs/guide.md has no "### Error kinds" section'
    end = re.compile(r'^#{1,3} ', re.M).search(text, start.end())
    body = text[start.end():end.start() if end else len(text)]
    headings = list(re.finditer(r'^#### `([a-z_]+)`\s*$', body, re.M))
    sections = {}
    for i, heading in enumerate(headings):
        stop = headings[i + 1].start() if i + 1 < len(headings) else len(body)
        assert heading.group(1) not in sections, 'error kind %s is documented twice' % heading.group(1)
        sections[heading.group(1)] = body[heading.end():stop]
    return sections


def test_every_error_kind_is_documented_in_the_guide():
    kinds = library_kinds()
    # The scan must see at least the hierarchy in errors.py; otherwise it is broken.
    hierarchy = set(cls.kind for _name, cls in inspect.getmembers(errors, inspect.isclass)
                    if issubclass(cls, errors.VmImageError))
    assert hierarchy and hierarchy <= set(kinds), 'scan missed %s' % sorted(hierarchy - set(kinds))

    sections = guide_sections()
    undocumented = dict((k, v) for k, v in kinds.items() if k not in sections)
    assert not undocumented, ('docs/guide.md ("### Error kinds") lacks a "#### `<kind>`" section for: %s'
                              % ', '.join('%s (set in %s)' % (k, ', '.join(v)) for k, v in sorted(undocumented.items())))
    stale = sorted(set(sections) - set(kinds))
    assert not stale, 'docs/guide.md documents error kinds the modules no longer return: %s' % stale
    for kind, section in sorted(sections.items()):
        assert re.search(r'^```\n.+?\n```$', section, re.M | re.S), \
            'the guide section for %s shows no example message' % kind


def _slug(heading):
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def test_guide_links_resolve():
    broken = []
    for doc in sorted(glob.glob(os.path.join(REPO, 'docs', '*.md'))):
        with open(doc) as f:
            text = f.read()
        prose = re.sub(r'^```.*?^```$', '', text, flags=re.M | re.S)
        anchors = set(_slug(h) for h in re.findall(r'^#+ (.+)$', prose, re.M))
        for target in re.findall(r'\]\(([^)\s]+)\)', prose):
            if re.match(r'^[a-z]+://', target):
                continue
            path, _sep, anchor = target.partition('#')
            if path:
                if not os.path.exists(os.path.join(os.path.dirname(doc), path)):
                    broken.append('%s: %s (no such file)' % (os.path.basename(doc), target))
            elif anchor not in anchors:
                broken.append('%s: %s (no such heading)' % (os.path.basename(doc), target))
    assert not broken, 'broken links in docs/: %s' % broken
