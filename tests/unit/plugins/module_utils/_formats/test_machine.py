# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tests for machine.json validation, migration and canonical form."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import random
import re

import pytest

from ansible_collections.vmimage.qemu.plugins.module_utils._formats import machine as m
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    InvalidMachineError,
    LimitExceededError,
)

UUID = '6f1c2a9e-3b4d-4e5f-8a6b-7c8d9e0f1a2b'
MAC = '5a:bc:de:f0:12:34'

FULL = {
    'version': 1,
    'uuid': UUID,
    'chipset': 'pc-i440fx-2.8',
    'cpu': 'host',
    'flags': [],
    'threads': 2,
    'cores': 4,
    'sockets': 1,
    'memory': 4096,
    'usb': 'piix4-usb-uhci',
    'network': 'rtl8139',
    'mac': MAC,
    'storage': 'virtio-blk-pci',
    'graphics': 'virtio-vga',
    'sound': 'hda-micro/ich9-intel-hda',
    'keyboard': 'PS/2',
    'keyboardLayout': 'pt-br',
    'mouse': 'PS/2',
    'tablet': 'none',
}


def v1(**fields):
    doc = {'version': 1}
    doc.update(fields)
    return doc


def invalid(data, field):
    """Run validate_machine expecting a failure on field; return the message."""
    with pytest.raises(InvalidMachineError) as info:
        m.validate_machine(data)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith('machine.json: %s: ' % field)
    return str(info.value)


# --- schema constants -------------------------------------------------------

def test_enum_constants_match_reference():
    assert m.MACHINE_SCHEMA_VERSION == 1
    assert m.CHIPSETS == ('pc-i440fx-2.8',)
    assert m.CPUS == ('host',)
    assert m.USB_CONTROLLERS == ('piix3-usb-uhci', 'piix4-usb-uhci', 'nec-usb-xhci')
    assert m.NETWORK_DEVICES == ('rtl8139', 'e1000')
    assert m.STORAGE_DEVICES == ('virtio-blk-pci',)
    assert m.GRAPHICS_DEVICES == ('VGA', 'vmware-svga', 'qxl-vga', 'virtio-vga')
    assert set(m.SOUND_DEVICES) == {
        'none', 'AC97', 'ES1370', 'hda-duplex/intel-hda', 'hda-micro/intel-hda',
        'hda-output/intel-hda', 'hda-duplex/ich9-intel-hda', 'hda-micro/ich9-intel-hda',
        'hda-output/ich9-intel-hda'}
    assert m.KEYBOARDS == ('usb-kbd', 'PS/2')
    assert m.MICE == ('usb-mouse', 'PS/2')
    assert m.TABLETS == ('usb-tablet', 'none')
    assert m.KEYBOARD_LAYOUTS == tuple(
        'ar da de de-ch en-gb en-us es et fi fo fr fr-be fr-ca fr-ch hr hu is it ja lt lv'
        ' mk nl nl-be no pl pt pt-br ru sl sv th tr'.split())
    assert m.FLAGS == ()


# --- validate_machine: whole documents ---------------------------------------

def test_full_document_accepted_and_copied():
    result = m.validate_machine(FULL)
    assert result == FULL
    assert result is not FULL
    assert result['flags'] is not FULL['flags']


def test_minimal_document():
    assert m.validate_machine({'version': 1}) == {'version': 1}


def test_input_not_modified():
    doc = {'version': 1, 'flags': [], 'memory': 512}
    m.validate_machine(doc)
    assert doc == {'version': 1, 'flags': [], 'memory': 512}


@pytest.mark.parametrize('data', [[], 'x', None, 1, [('version', 1)]])
def test_non_object_rejected(data):
    invalid(data, '(document)')


# --- version ----------------------------------------------------------------

def test_version_missing():
    assert 'is required' in invalid({'memory': 1}, 'version')


@pytest.mark.parametrize('version', [0, 2, -1, '1', 1.0, True, None, [1]])
def test_version_wrong(version):
    msg = invalid({'version': version}, 'version')
    assert 'must be the integer 1' in msg


# --- unknown properties -----------------------------------------------------

@pytest.mark.parametrize('name', ['Memory', 'ram', 'keyboard_layout', 'layout', ''])
def test_unknown_property_named(name):
    msg = invalid(v1(**{name: 1}), name if name else "''")
    assert 'unknown property' in msg
    assert 'keyboardLayout' in msg  # the allowed list is shown


def test_unknown_property_with_odd_name_is_quoted_and_truncated():
    name = 'x\n' + 'y' * 5000
    with pytest.raises(InvalidMachineError) as info:
        m.validate_machine({'version': 1, name: 1})
    assert '\n' not in info.value.field
    assert len(info.value.field) <= 60


# --- integers ---------------------------------------------------------------

@pytest.mark.parametrize('field', ['threads', 'cores', 'sockets'])
@pytest.mark.parametrize('value', [1, 2, 254, 255])
def test_cpu_counts_accepted(field, value):
    assert m.validate_machine(v1(**{field: value}))[field] == value


@pytest.mark.parametrize('field', ['threads', 'cores', 'sockets'])
@pytest.mark.parametrize('value', [0, 256, -1, 2 ** 64])
def test_cpu_counts_out_of_range(field, value):
    msg = invalid(v1(**{field: value}), field)
    assert 'must be an integer between 1 and 255' in msg


@pytest.mark.parametrize('value', [1, 1024, 1048576])
def test_memory_accepted(value):
    assert m.validate_machine(v1(memory=value))['memory'] == value


@pytest.mark.parametrize('value', [0, 1048577, -1024])
def test_memory_out_of_range(value):
    msg = invalid(v1(memory=value), 'memory')
    assert msg == ('machine.json: memory: must be an integer between 1 and 1048576 (got %d)' % value)


@pytest.mark.parametrize('field', ['threads', 'cores', 'sockets', 'memory'])
@pytest.mark.parametrize('value', [True, False, 2.0, 1.5, '2', None, [2], {'n': 2}, float('nan')])
def test_integers_reject_other_types(field, value):
    invalid(v1(**{field: value}), field)


def test_true_is_not_one():
    assert '(got True)' in invalid(v1(threads=True), 'threads')


# --- enums ------------------------------------------------------------------

ENUMS = [
    ('chipset', m.CHIPSETS, ['PC-i440fx-2.8', 'pc-i440fx-2.9', 'q35']),
    ('cpu', m.CPUS, ['Host', 'qemu64']),
    ('usb', m.USB_CONTROLLERS, ['NEC-USB-XHCI', 'qemu-xhci', 'piix3-usb-uhci ']),
    ('network', m.NETWORK_DEVICES, ['E1000', 'virtio', 'rtl8139\n']),
    ('storage', m.STORAGE_DEVICES, ['virtio-blk', 'ide-hd']),
    ('graphics', m.GRAPHICS_DEVICES, ['vga', 'Vmware-svga', 'cirrus-vga']),
    ('sound', m.SOUND_DEVICES, ['None', 'ac97', 'hda-duplex', 'hda-duplex/intel-hda/x']),
    ('keyboard', m.KEYBOARDS, ['ps/2', 'USB-KBD', 'PS2']),
    ('keyboardLayout', m.KEYBOARD_LAYOUTS, ['EN-US', 'en', 'en_us', 'de-at']),
    ('mouse', m.MICE, ['ps/2', 'usb-tablet']),
    ('tablet', m.TABLETS, ['None', 'usb-mouse', '']),
]


@pytest.mark.parametrize('field,value', [(f, v) for f, allowed, _bad in ENUMS for v in allowed])
def test_enum_accepts_every_listed_value(field, value):
    assert m.validate_machine(v1(**{field: value}))[field] == value


@pytest.mark.parametrize('field,value', [(f, v) for f, _allowed, bad in ENUMS for v in bad])
def test_enum_rejects_near_miss(field, value):
    msg = invalid(v1(**{field: value}), field)
    assert 'must be one of' in msg
    assert repr(value) in msg


@pytest.mark.parametrize('field', [f for f, _allowed, _bad in ENUMS])
@pytest.mark.parametrize('value', [1, None, True, ['e1000'], {'a': 'b'}])
def test_enum_rejects_non_strings(field, value):
    invalid(v1(**{field: value}), field)


def test_enum_message_exact():
    assert str(pytest.raises(InvalidMachineError, m.validate_machine, v1(network='virtio')).value) == (
        "machine.json: network: must be one of rtl8139, e1000 (got 'virtio')")


def test_huge_value_truncated_in_message():
    msg = invalid(v1(network='x' * 100000), 'network')
    assert len(msg) < 200
    msg = invalid(v1(memory=10 ** 5000), 'memory')
    assert len(msg) < 200
    msg = invalid(v1(network=list(range(100000))), 'network')
    assert len(msg) < 200


# --- flags ------------------------------------------------------------------

def test_flags_empty_accepted():
    assert m.validate_machine(v1(flags=[]))['flags'] == []


@pytest.mark.parametrize('value', [None, '', 'x', {}, (), 0])
def test_flags_must_be_array(value):
    assert 'must be an array' in invalid(v1(flags=value), 'flags')


@pytest.mark.parametrize('value,first', [
    (['kvm'], "'kvm'"), (['a', 'b'], "'a'"), ([1], '1'), ([None], 'None'),
])
def test_flags_non_empty_rejected_naming_first(value, first):
    msg = invalid(v1(flags=value), 'flags')
    assert 'unknown flag %s' % first in msg


# --- uuid -------------------------------------------------------------------

@pytest.mark.parametrize('value', [
    UUID,
    '00000000-0000-1000-8000-000000000000',
    'ffffffff-ffff-5fff-bfff-ffffffffffff',
    'a0b1c2d3-e4f5-3a6b-9c7d-8e9f0a1b2c3d',
    'a0b1c2d3-e4f5-2a6b-ac7d-8e9f0a1b2c3d',
])
def test_uuid_accepted(value):
    assert m.validate_machine(v1(uuid=value))['uuid'] == value
    assert m.is_valid_uuid(value)


@pytest.mark.parametrize('value', [
    UUID.upper(),
    '6F1c2a9e-3b4d-4e5f-8a6b-7c8d9e0f1a2b',
    '6f1c2a9e-3b4d-0e5f-8a6b-7c8d9e0f1a2b',   # version 0
    '6f1c2a9e-3b4d-6e5f-8a6b-7c8d9e0f1a2b',   # version 6
    '6f1c2a9e-3b4d-4e5f-ca6b-7c8d9e0f1a2b',   # variant c
    '6f1c2a9e-3b4d-4e5f-7a6b-7c8d9e0f1a2b',   # variant 7 (NCS)
    '00000000-0000-0000-0000-000000000000',   # nil
    '6f1c2a9e3b4d4e5f8a6b7c8d9e0f1a2b',       # no hyphens
    '{6f1c2a9e-3b4d-4e5f-8a6b-7c8d9e0f1a2b}',
    'urn:uuid:6f1c2a9e-3b4d-4e5f-8a6b-7c8d9e0f1a2b',
    UUID + '\n',
    ' ' + UUID,
    UUID[:-1] + 'g',
    '',
    1,
    None,
])
def test_uuid_rejected(value):
    msg = invalid(v1(uuid=value), 'uuid')
    assert 'RFC 4122' in msg
    assert not m.is_valid_uuid(value)


def test_random_uuid_valid_and_distinct():
    values = {m.random_uuid() for _i in range(100)}
    assert len(values) == 100
    assert all(m.is_valid_uuid(v) for v in values)


# --- mac --------------------------------------------------------------------

@pytest.mark.parametrize('value', [MAC, '06:00:00:00:00:00', 'fa:ff:ff:ff:ff:ff', '5e:ab:cd:ef:01:23'])
def test_mac_accepted(value):
    assert m.validate_machine(v1(mac=value))['mac'] == value
    assert m.is_valid_mac(value)


@pytest.mark.parametrize('value', [
    MAC.upper(),
    '02:AB:cd:ef:01:23',
    '00:11:22:33:44:55',   # global unicast
    '01:11:22:33:44:55',   # global multicast
    '03:11:22:33:44:55',   # local multicast
    'ff:ff:ff:ff:ff:ff',   # broadcast
    '02-11-22-33-44-55',
    '021122334455',
    '02:11:22:33:44',
    '02:11:22:33:44:55:66',
    MAC + '\n',
    '2:11:22:33:44:55',
    '',
    0x021122334455,
    None,
])
def test_mac_rejected(value):
    msg = invalid(v1(mac=value), 'mac')
    assert 'MAC' in msg
    assert not m.is_valid_mac(value)


def test_random_mac_always_valid_unicast_local():
    rng = random.Random(1234)
    seen = set()
    for _i in range(10000):
        mac = m.random_mac(rng)
        assert m.is_valid_mac(mac), mac
        first = int(mac[:2], 16)
        assert first & 0x02, mac        # locally administered
        assert not first & 0x01, mac    # unicast
        seen.add(mac)
    assert len(seen) > 9990


def test_random_mac_default_source():
    values = {m.random_mac() for _i in range(10000)}
    assert len(values) > 9990
    assert all(re.fullmatch(r'[0-9a-f][26ae](:[0-9a-f]{2}){5}', v) for v in values)


def test_random_mac_uses_rng_bits():
    class AllOnes(object):
        def getrandbits(self, n):
            return (1 << n) - 1

    class AllZeros(object):
        def getrandbits(self, n):
            return 0

    assert m.random_mac(AllOnes()) == 'fe:ff:ff:ff:ff:ff'
    assert m.random_mac(AllZeros()) == '02:00:00:00:00:00'


# --- version 0 migration ----------------------------------------------------

V0 = {
    'uuid': UUID,
    'memory': 2048,
    'cpu': {'threads': 2, 'cores': 4, 'sockets': 2},
    'network': {'device': 'rtl8139', 'mac': MAC},
    'keyboard': {'layout': 'de-ch'},
    'sound': {'device': 'hda-duplex', 'controller': 'intel-hda'},
}


def test_migrate_v0_golden():
    assert m.migrate_machine(V0) == {
        'version': 1,
        'uuid': UUID,
        'memory': 2048,
        'threads': 1,
        'cores': 4,
        'sockets': 2,
        'network': 'e1000',
        'mac': MAC,
        'keyboardLayout': 'de-ch',
        'sound': 'hda-duplex/intel-hda',
        'graphics': 'vmware-svga',
        'tablet': 'none',
    }


def test_migrate_v0_empty():
    assert m.migrate_machine({}) == {
        'version': 1, 'network': 'e1000', 'graphics': 'vmware-svga', 'tablet': 'none', 'threads': 1}


@pytest.mark.parametrize('sound,expected', [
    ({'device': 'AC97'}, 'AC97'),
    ({'device': 'ES1370', 'controller': ''}, 'ES1370'),
    ({'device': 'hda-output', 'controller': 'ich9-intel-hda'}, 'hda-output/ich9-intel-hda'),
    ({}, None),
])
def test_migrate_v0_sound(sound, expected):
    result = m.migrate_machine({'sound': sound})
    assert result.get('sound') == expected


def test_migrate_v1_returns_validated_copy():
    result = m.migrate_machine(FULL)
    assert result == FULL and result is not FULL


@pytest.mark.parametrize('doc,field', [
    ({'cpu': {'cores': '2'}}, 'cpu.cores'),
    ({'cpu': {'cores': True}}, 'cpu.cores'),
    ({'cpu': {'sockets': 0}}, 'cpu.sockets'),
    ({'cpu': {'threads': '1'}}, 'cpu.threads'),
    ({'cpu': {'foo': 1}}, 'cpu.foo'),
    ({'cpu': 4}, 'cpu'),
    ({'cpu': [1, 2]}, 'cpu'),
    ({'network': {'mac': 'AA:BB:CC:DD:EE:FF'}}, 'network.mac'),
    ({'network': {'device': 1}}, 'network.device'),
    ({'network': {'model': 'e1000'}}, 'network.model'),
    ({'network': None}, 'network'),
    ({'keyboard': {'layout': 'xx'}}, 'keyboard.layout'),
    ({'keyboard': {'layout': 1}}, 'keyboard.layout'),
    ({'keyboard': []}, 'keyboard'),
    ({'sound': {'device': 5}}, 'sound.device'),
    ({'sound': {'device': 'hda-duplex', 'controller': 7}}, 'sound.controller'),
    ({'sound': {'controller': 'intel-hda'}}, 'sound.device'),
    ({'sound': {'device': 'hda-duplex', 'controller': 'bogus'}}, 'sound'),
    ({'sound': {'device': 'hda-duplex'}}, 'sound.device'),
    ({'memory': 2.0}, 'memory'),
    ({'memory': 0}, 'memory'),
    ({'uuid': UUID.upper()}, 'uuid'),
    ({'extra': 1}, 'extra'),
])
def test_migrate_v0_bad(doc, field):
    with pytest.raises(InvalidMachineError) as info:
        m.migrate_machine(doc)
    assert info.value.field == field, str(info.value)


@pytest.mark.parametrize('doc', [
    {'memory': 1024, 'graphics': 'VGA'},
    {'cpu': 'host'},
    {'network': 'e1000'},
])
def test_migrate_v1_without_version_says_version_missing(doc):
    with pytest.raises(InvalidMachineError) as info:
        m.migrate_machine(doc)
    assert info.value.field == 'version'
    assert 'is required' in str(info.value)


@pytest.mark.parametrize('version', [0, 2, '1', None])
def test_migrate_explicit_bad_version(version):
    with pytest.raises(InvalidMachineError) as info:
        m.migrate_machine({'version': version})
    assert info.value.field == 'version'


def test_migrate_non_object():
    with pytest.raises(InvalidMachineError) as info:
        m.migrate_machine([V0])
    assert info.value.field == '(document)'


# --- load_machine_json ------------------------------------------------------

def _load_error(raw):
    with pytest.raises(InvalidMachineError) as info:
        m.load_machine_json(raw)
    return info.value


def test_load_v1():
    assert m.load_machine_json(json.dumps(FULL).encode()) == FULL


def test_load_v0_migrates():
    assert m.load_machine_json(json.dumps(V0).encode())['sound'] == 'hda-duplex/intel-hda'


def test_load_accepts_bytearray_and_memoryview():
    raw = b'{"version": 1}'
    assert m.load_machine_json(bytearray(raw)) == {'version': 1}
    assert m.load_machine_json(memoryview(raw)) == {'version': 1}


def test_load_rejects_str():
    with pytest.raises(TypeError):
        m.load_machine_json('{"version": 1}')


def test_load_size_cap():
    body = b'{"version": 1}'
    exact = body + b' ' * (1024 * 1024 - len(body))
    assert len(exact) == 1024 * 1024
    assert m.load_machine_json(exact) == {'version': 1}
    with pytest.raises(LimitExceededError):
        m.load_machine_json(exact + b' ')


def test_load_size_cap_checked_before_parsing():
    # Over the cap and also invalid: the limit must win, proving no parse happened.
    with pytest.raises(LimitExceededError):
        m.load_machine_json(b'[' * 2000, max_size=1000)
    with pytest.raises(LimitExceededError):
        m.load_machine_json(b'{"version": 1}', max_size=5)


@pytest.mark.parametrize('raw,words', [
    (b'{"version": 1, "memory": 1, "memory": 2}', "duplicate key 'memory'"),
    (b'{"version": 1, "x": {"a": 1, "a": 1}}', "duplicate key 'a'"),
    (b'{"version": 1, "memory": NaN}', 'NaN'),
    (b'{"version": 1, "memory": Infinity}', 'Infinity'),
    (b'{"version": 1, "memory": -Infinity}', '-Infinity'),
    (b'[{"version": 1}]', 'must be a JSON object'),
    (b'"x"', 'must be a JSON object'),
    (b'null', 'must be a JSON object'),
    (b'1', 'must be a JSON object'),
    (b'', 'not valid JSON'),
    (b'{"version": 1', 'not valid JSON'),
    (b'{"version": 1}{}', 'not valid JSON'),
    (b"{'version': 1}", 'not valid JSON'),
    (b'{"version": 1,}', 'not valid JSON'),
    (b'{"version": 1, "network": "e1\xff000"}', 'UTF-8'),
    (b'\xef\xbb\xbf{"version": 1}', 'not valid JSON'),
    (b'{"version": 1, "memory": ' + b'9' * 5000 + b'}', ''),
])
def test_load_bad_documents(raw, words):
    err = _load_error(raw)
    assert err.field in ('(document)', 'memory')
    assert words in str(err)


def test_load_lone_surrogate_escape_is_not_valid_utf8_json_value():
    err = _load_error(b'{"version": 1, "network": "\\ud800"}')
    assert err.field == 'network'


@pytest.mark.parametrize('opener,closer', [(b'[', b']'), (b'{"a":', b'}')])
def test_load_deep_nesting_rejected(opener, closer):
    raw = b'{"version": 1, "flags": ' + opener * 100000 + b'1' + closer * 100000 + b'}'
    err = _load_error(raw)
    assert err.field == '(document)'
    assert 'nested deeper' in str(err)


def test_load_brackets_inside_strings_do_not_count_as_nesting():
    raw = json.dumps({'version': 1, 'network': '[' * 1000 + '\\"{' * 100}).encode()
    err = _load_error(raw)
    assert err.field == 'network'


def test_load_moderate_nesting_reaches_validation():
    raw = b'{"version": 1, "flags": [[[[1]]]]}'
    err = _load_error(raw)
    assert err.field == 'flags'


def test_load_semantic_error_passes_through():
    err = _load_error(b'{"version": 1, "memory": 0}')
    assert str(err) == 'machine.json: memory: must be an integer between 1 and 1048576 (got 0)'


# --- dump_machine_json ------------------------------------------------------

def test_dump_canonical_bytes():
    raw = m.dump_machine_json({'version': 1, 'memory': 512, 'cpu': 'host', 'flags': []})
    assert raw == b'{\n  "cpu": "host",\n  "flags": [],\n  "memory": 512,\n  "version": 1\n}\n'


def test_dump_deterministic_regardless_of_key_order():
    items = list(FULL.items())
    shuffled = dict(random.Random(7).sample(items, len(items)))
    assert list(shuffled) != list(FULL)
    assert m.dump_machine_json(shuffled) == m.dump_machine_json(FULL)
    assert m.dump_machine_json(FULL) == m.dump_machine_json(FULL)


def test_dump_round_trip():
    raw = m.dump_machine_json(FULL)
    assert m.load_machine_json(raw) == FULL
    assert m.dump_machine_json(m.load_machine_json(raw)) == raw


def test_dump_matches_documented_format():
    expected = (json.dumps(FULL, sort_keys=True, indent=2, separators=(',', ': ')) + '\n').encode('utf-8')
    assert m.dump_machine_json(FULL) == expected


def test_dump_refuses_invalid_machine():
    with pytest.raises(InvalidMachineError) as info:
        m.dump_machine_json(v1(memory=0))
    assert info.value.field == 'memory'


# --- apply_defaults ---------------------------------------------------------

def test_defaults_values():
    d = m.MACHINE_DEFAULTS
    assert d['graphics'] == 'qxl-vga'
    assert d['usb'] == 'nec-usb-xhci'
    assert d['network'] == 'e1000'
    assert 'uuid' not in d and 'mac' not in d
    assert m.validate_machine(dict(d, version=1)) == dict(d, version=1)


def test_apply_defaults_fills_everything_but_identity():
    result = m.apply_defaults({'version': 1})
    assert 'uuid' not in result
    assert 'mac' not in result
    assert set(result) == set(m.MACHINE_FIELDS) - {'uuid', 'mac'}
    for name, value in m.MACHINE_DEFAULTS.items():
        assert result[name] == value


def test_apply_defaults_keeps_given_values():
    result = m.apply_defaults(v1(uuid=UUID, mac=MAC, memory=8, graphics='VGA'))
    assert result['uuid'] == UUID
    assert result['mac'] == MAC
    assert result['memory'] == 8
    assert result['graphics'] == 'VGA'
    assert result['usb'] == 'nec-usb-xhci'


def test_apply_defaults_does_not_share_or_mutate():
    doc = {'version': 1}
    first = m.apply_defaults(doc)
    assert doc == {'version': 1}
    first['flags'].append('x')
    assert m.MACHINE_DEFAULTS['flags'] == []
    assert m.apply_defaults(doc)['flags'] == []


def test_apply_defaults_validates():
    with pytest.raises(InvalidMachineError) as info:
        m.apply_defaults(v1(tablet='yes'))
    assert info.value.field == 'tablet'


# --- merge_machine ----------------------------------------------------------

def test_merge_overrides_and_removes():
    base = dict(FULL)
    result = m.merge_machine(base, {'memory': 16, 'mac': None, 'graphics': 'VGA', 'nothing': None})
    assert result['memory'] == 16
    assert result['graphics'] == 'VGA'
    assert 'mac' not in result
    assert result['uuid'] == UUID
    assert base == FULL


def test_merge_empty_overrides():
    assert m.merge_machine(FULL, {}) == FULL


def test_merge_same_version_allowed():
    assert m.merge_machine(FULL, {'version': 1}) == FULL


@pytest.mark.parametrize('version', [2, 0, None, True, '1'])
def test_merge_cannot_change_version(version):
    with pytest.raises(InvalidMachineError) as info:
        m.merge_machine(FULL, {'version': version})
    assert info.value.field == 'version'


@pytest.mark.parametrize('overrides,field', [
    ({'memory': 0}, 'memory'),
    ({'network': 'virtio'}, 'network'),
    ({'colour': 'red'}, 'colour'),
    ({'threads': True}, 'threads'),
])
def test_merge_invalid_override_named(overrides, field):
    with pytest.raises(InvalidMachineError) as info:
        m.merge_machine(FULL, overrides)
    assert info.value.field == field


def test_merge_overrides_must_be_object():
    with pytest.raises(InvalidMachineError) as info:
        m.merge_machine(FULL, ['memory'])
    assert info.value.field == '(overrides)'
