"""Every module's DOCUMENTATION/EXAMPLES/RETURN parse and render with
ansible-doc, and its documented options match its argument_spec."""

import json
import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'plugins', 'modules'))
                 if f.endswith('.py') and not f.startswith('_'))


def _ansible_doc(*args):
    cmd = [os.path.join(os.path.dirname(sys.executable), 'ansible-doc')] + list(args)
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          env=dict(os.environ, ANSIBLE_NOCOLOR='1'), timeout=120, check=False)


@pytest.mark.parametrize('module', MODULES)
def test_ansible_doc_renders(module):
    proc = _ansible_doc('--json', 'vmimage.qemu.' + module)
    assert proc.returncode == 0 and 'ERROR' not in proc.stderr, proc.stderr
    doc = json.loads(proc.stdout)['vmimage.qemu.' + module]
    assert doc['doc']['short_description']
    assert doc['examples'] and yaml.safe_load(doc['examples'])
    assert doc['return'] is not None
    text = _ansible_doc('vmimage.qemu.' + module)
    assert text.returncode == 0 and module in text.stdout


@pytest.mark.parametrize('module', MODULES)
def test_documented_options_match_argument_spec(module, monkeypatch):
    """The docs and the code must describe the same options."""
    import importlib
    from ansible.module_utils import basic

    captured = {}

    class _Stop(Exception):
        pass

    def fake_init(self, argument_spec, **kw):
        captured['spec'] = argument_spec
        raise _Stop()

    monkeypatch.setattr(basic.AnsibleModule, '__init__', fake_init)
    mod = importlib.import_module('ansible_collections.vmimage.qemu.plugins.modules.' + module)
    with pytest.raises(_Stop):
        mod.main()
    proc = _ansible_doc('--json', 'vmimage.qemu.' + module)
    documented = json.loads(proc.stdout)['vmimage.qemu.' + module]['doc']['options']
    assert set(documented) == set(captured['spec'])
    for name, spec in captured['spec'].items():
        assert documented[name].get('type', 'str') == spec.get('type', 'str'), name
        if 'default' in spec and spec['default'] not in (None, [], {}):
            assert documented[name].get('default') == spec['default'], name
        if spec.get('no_log'):
            assert 'password' in name or 'secret' in name
