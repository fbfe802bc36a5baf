# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""machine.json: schema, validation, migration and canonical form.

An image's ``machine.json`` is untrusted input.  Everything here either
returns a fresh, normalised version-1 dict or raises InvalidMachineError
naming the offending field and the rule it broke, so a caller never has to
look at the raw document again.

Version 1 is the only version written.  Version 0 (no ``version`` key) is
read and migrated the way the original engine did.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import re
import reprlib
import uuid

from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    InvalidMachineError,
    LimitExceededError,
)

MACHINE_SCHEMA_VERSION = 1

CHIPSETS = ('pc-i440fx-2.8',)
CPUS = ('host',)
USB_CONTROLLERS = ('piix3-usb-uhci', 'piix4-usb-uhci', 'nec-usb-xhci')
NETWORK_DEVICES = ('rtl8139', 'e1000')
STORAGE_DEVICES = ('virtio-blk-pci',)
GRAPHICS_DEVICES = ('VGA', 'vmware-svga', 'qxl-vga', 'virtio-vga')
SOUND_DEVICES = (
    'none', 'AC97', 'ES1370',
    'hda-duplex/intel-hda', 'hda-micro/intel-hda', 'hda-output/intel-hda',
    'hda-duplex/ich9-intel-hda', 'hda-micro/ich9-intel-hda', 'hda-output/ich9-intel-hda',
)
KEYBOARDS = ('usb-kbd', 'PS/2')
KEYBOARD_LAYOUTS = (
    'ar', 'da', 'de', 'de-ch', 'en-gb', 'en-us', 'es', 'et', 'fi', 'fo', 'fr', 'fr-be',
    'fr-ca', 'fr-ch', 'hr', 'hu', 'is', 'it', 'ja', 'lt', 'lv', 'mk', 'nl', 'nl-be',
    'no', 'pl', 'pt', 'pt-br', 'ru', 'sl', 'sv', 'th', 'tr',
)
MICE = ('usb-mouse', 'PS/2')
TABLETS = ('usb-tablet', 'none')
# The schema defines no flag values yet, so the only valid array is [].
FLAGS = ()

CPU_COUNT_MIN = 1
CPU_COUNT_MAX = 255
MEMORY_MIN = 1
MEMORY_MAX = 1048576

MAC_PATTERN = r'[0-9a-f][26ae](:[0-9a-f]{2}){5}'
UUID_PATTERN = r'[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}'
# fullmatch, not ^...$: '$' also matches before a trailing newline.
_MAC_RE = re.compile(MAC_PATTERN)
_UUID_RE = re.compile(UUID_PATTERN)

# Property order of a version-1 document (also the order of the output dicts).
MACHINE_FIELDS = (
    'version', 'uuid', 'chipset', 'cpu', 'flags', 'threads', 'cores', 'sockets',
    'memory', 'usb', 'network', 'mac', 'storage', 'graphics', 'sound', 'keyboard',
    'keyboardLayout', 'mouse', 'tablet',
)

# uuid and mac are deliberately absent: the original gave every VM the same
# default identity, and two instances on one bridge then collided.
MACHINE_DEFAULTS = {
    'chipset': 'pc-i440fx-2.8',
    'cpu': 'host',
    'flags': [],
    'threads': 1,
    'cores': 1,
    'sockets': 1,
    'memory': 1024,
    'usb': 'nec-usb-xhci',
    'network': 'e1000',
    'storage': 'virtio-blk-pci',
    'graphics': 'qxl-vga',
    'sound': 'none',
    'keyboard': 'usb-kbd',
    'keyboardLayout': 'en-us',
    'mouse': 'usb-mouse',
    'tablet': 'usb-tablet',
}

MACHINE_JSON_MAX_SIZE = 1024 * 1024
# Legitimate documents nest two levels (v0 sub-objects, the flags array);
# the bound only has to stop recursion bombs aimed at the JSON parser.
MAX_JSON_DEPTH = 16

_V0_FIELDS = ('uuid', 'memory', 'cpu', 'network', 'keyboard', 'sound')
_V0_SUBFIELDS = {
    'cpu': ('threads', 'cores', 'sockets'),
    'network': ('device', 'mac'),
    'keyboard': ('layout',),
    'sound': ('device', 'controller'),
}

_SHOW_MAX = 60
_SIMPLE_NAME_RE = re.compile(r'[A-Za-z0-9_-]{1,60}')

_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxstring = _SHOW_MAX
_repr.maxother = _SHOW_MAX
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 4


def _show(value):
    """A short printable form of an untrusted value for error messages."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        # repr() of a huge int is slow and past 4300 digits raises on 3.11+.
        return '<integer of %d bits>' % value.bit_length()
    try:
        text = _repr.repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = '<%s>' % type(value).__name__
    if len(text) > _SHOW_MAX:
        text = text[:_SHOW_MAX - 3] + '...'
    return text


def _show_text(text):
    return text if len(text) <= 200 else text[:197] + '...'


def _field_name(name, prefix=''):
    """Field path for a property name, quoted when it is not a plain name
    (keys come from untrusted input and end up in logs)."""
    if not (isinstance(name, str) and _SIMPLE_NAME_RE.fullmatch(name)):
        name = _show(name)
    return prefix + name


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(field, value, low, high):
    if not (_is_int(value) and low <= value <= high):
        raise InvalidMachineError(
            field, 'must be an integer between %d and %d (got %s)' % (low, high, _show(value)))
    return int(value)


def _check_enum(field, value, allowed):
    if not (isinstance(value, str) and value in allowed):
        raise InvalidMachineError(
            field, 'must be one of %s (got %s)' % (', '.join(allowed), _show(value)))
    return str(value)


def _check_uuid(field, value):
    if not is_valid_uuid(value):
        raise InvalidMachineError(
            field, 'must be a lowercase RFC 4122 UUID with version 1-5 and variant 8, 9, a or b'
                   ' (got %s)' % _show(value))
    return str(value)


def _check_mac(field, value):
    if not is_valid_mac(value):
        raise InvalidMachineError(
            field, 'must be a lowercase, locally administered, unicast MAC address'
                   ' matching ^%s$ (got %s)' % (MAC_PATTERN, _show(value)))
    return str(value)


def _check_flags(field, value):
    if not isinstance(value, list):
        raise InvalidMachineError(field, 'must be an array (got %s)' % _show(value))
    for flag in value:
        if flag not in FLAGS:
            raise InvalidMachineError(
                field, 'unknown flag %s (no flags are defined, so it must be [])' % _show(flag))
    return list(value)


def _check_object(field, value):
    if not isinstance(value, dict):
        raise InvalidMachineError(field, 'must be an object (got %s)' % _show(value))


def _check_known(data, allowed, prefix=''):
    for key in data:
        if key not in allowed:
            raise InvalidMachineError(
                _field_name(key, prefix), 'unknown property (allowed: %s)' % ', '.join(allowed))


def _cpu_count(field, value):
    return _check_int(field, value, CPU_COUNT_MIN, CPU_COUNT_MAX)


_VALIDATORS = {
    'uuid': _check_uuid,
    'chipset': lambda f, v: _check_enum(f, v, CHIPSETS),
    'cpu': lambda f, v: _check_enum(f, v, CPUS),
    'flags': _check_flags,
    'threads': _cpu_count,
    'cores': _cpu_count,
    'sockets': _cpu_count,
    'memory': lambda f, v: _check_int(f, v, MEMORY_MIN, MEMORY_MAX),
    'usb': lambda f, v: _check_enum(f, v, USB_CONTROLLERS),
    'network': lambda f, v: _check_enum(f, v, NETWORK_DEVICES),
    'mac': _check_mac,
    'storage': lambda f, v: _check_enum(f, v, STORAGE_DEVICES),
    'graphics': lambda f, v: _check_enum(f, v, GRAPHICS_DEVICES),
    'sound': lambda f, v: _check_enum(f, v, SOUND_DEVICES),
    'keyboard': lambda f, v: _check_enum(f, v, KEYBOARDS),
    'keyboardLayout': lambda f, v: _check_enum(f, v, KEYBOARD_LAYOUTS),
    'mouse': lambda f, v: _check_enum(f, v, MICE),
    'tablet': lambda f, v: _check_enum(f, v, TABLETS),
}


def is_valid_mac(value):
    """True if value is a lowercase, locally administered, unicast MAC string."""
    return isinstance(value, str) and _MAC_RE.fullmatch(value) is not None


def is_valid_uuid(value):
    """True if value is a lowercase RFC 4122 UUID string (version 1-5)."""
    return isinstance(value, str) and _UUID_RE.fullmatch(value) is not None


def validate_machine(data):
    """Validate a version-1 machine document; return a new normalised dict.

    Raises InvalidMachineError(field, rule) at the first broken rule.
    """
    if not isinstance(data, dict):
        raise InvalidMachineError('(document)', 'must be a JSON object (got %s)' % _show(data))
    if 'version' not in data:
        raise InvalidMachineError('version', 'is required and must be %d' % MACHINE_SCHEMA_VERSION)
    version = data['version']
    if not (_is_int(version) and version == MACHINE_SCHEMA_VERSION):
        raise InvalidMachineError(
            'version', 'must be the integer %d (got %s)' % (MACHINE_SCHEMA_VERSION, _show(version)))
    _check_known(data, MACHINE_FIELDS)
    result = {'version': MACHINE_SCHEMA_VERSION}
    for name in MACHINE_FIELDS[1:]:
        if name in data:
            result[name] = _VALIDATORS[name](name, data[name])
    return result


def _looks_like_v1(data):
    """A document without ``version`` that uses version-1 properties is a
    version-1 document missing its version, not a broken version-0 one."""
    for key, value in data.items():
        if key in MACHINE_FIELDS and key not in _V0_FIELDS:
            return True
        if key in _V0_SUBFIELDS and isinstance(value, str):
            return True
    return False


def _migrate_v0(data):
    _check_known(data, _V0_FIELDS)
    for name, subfields in _V0_SUBFIELDS.items():
        if name in data:
            _check_object(name, data[name])
            _check_known(data[name], subfields, name + '.')
    cpu = data.get('cpu', {})
    network = data.get('network', {})
    keyboard = data.get('keyboard', {})
    sound = data.get('sound', {})

    # The original forced these whatever the v0 document said.
    result = {
        'version': MACHINE_SCHEMA_VERSION,
        'network': 'e1000',
        'graphics': 'vmware-svga',
        'tablet': 'none',
        'threads': 1,
    }
    if 'uuid' in data:
        result['uuid'] = _check_uuid('uuid', data['uuid'])
    if 'memory' in data:
        result['memory'] = _check_int('memory', data['memory'], MEMORY_MIN, MEMORY_MAX)

    # Ignored values are only type-checked: old writers may have left
    # zero values in them, which never mattered.
    if 'threads' in cpu and not _is_int(cpu['threads']):
        raise InvalidMachineError('cpu.threads', 'must be an integer (got %s)' % _show(cpu['threads']))
    if 'device' in network and not isinstance(network['device'], str):
        raise InvalidMachineError('network.device', 'must be a string (got %s)' % _show(network['device']))

    for name in ('cores', 'sockets'):
        if name in cpu:
            result[name] = _cpu_count('cpu.' + name, cpu[name])
    if 'mac' in network:
        result['mac'] = _check_mac('network.mac', network['mac'])
    if 'layout' in keyboard:
        result['keyboardLayout'] = _check_enum('keyboard.layout', keyboard['layout'], KEYBOARD_LAYOUTS)

    for name in ('device', 'controller'):
        if name in sound and not isinstance(sound[name], str):
            raise InvalidMachineError('sound.' + name, 'must be a string (got %s)' % _show(sound[name]))
    device = sound.get('device', '')
    controller = sound.get('controller', '')
    if controller:
        if not device:
            raise InvalidMachineError('sound.device', 'is required when sound.controller is set')
        result['sound'] = _check_enum('sound', device + '/' + controller, SOUND_DEVICES)
    elif 'device' in sound:
        result['sound'] = _check_enum('sound.device', device, SOUND_DEVICES)

    return validate_machine(result)


def migrate_machine(data):
    """Return a validated version-1 dict from a version-1 or version-0 document."""
    if not isinstance(data, dict):
        raise InvalidMachineError('(document)', 'must be a JSON object (got %s)' % _show(data))
    if 'version' in data:
        return validate_machine(data)
    if _looks_like_v1(data):
        raise InvalidMachineError(
            'version', 'is required and must be %d (the document uses version %d properties)'
                       % (MACHINE_SCHEMA_VERSION, MACHINE_SCHEMA_VERSION))
    return _migrate_v0(data)


_JSON_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET_RE = re.compile(r'[\[\]{}]')


def _check_depth(text, limit):
    # Done before parsing: the json scanner recurses once per level, so a
    # deep document would otherwise be a RecursionError inside the parser.
    depth = 0
    for match in _JSON_BRACKET_RE.finditer(_JSON_STRING_RE.sub('""', text)):
        if match.group() in '[{':
            depth += 1
            if depth > limit:
                raise InvalidMachineError('(document)', 'nested deeper than %d levels' % limit)
        else:
            depth -= 1


def _object_without_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise InvalidMachineError('(document)', 'duplicate key %s' % _show(key))
        result[key] = value
    return result


def _reject_constant(name):
    raise InvalidMachineError('(document)', '%s is not valid JSON' % name)


def load_machine_json(raw_bytes, max_size=MACHINE_JSON_MAX_SIZE):
    """Parse machine.json bytes (strict UTF-8 JSON, at most max_size bytes)
    and return the validated version-1 dict, migrating version 0."""
    if isinstance(raw_bytes, memoryview):
        raw_bytes = raw_bytes.tobytes()
    if not isinstance(raw_bytes, (bytes, bytearray)):
        raise TypeError('load_machine_json() needs bytes, not %s' % type(raw_bytes).__name__)
    if len(raw_bytes) > max_size:
        raise LimitExceededError(
            'machine.json is %d bytes, more than the limit of %d bytes' % (len(raw_bytes), max_size))
    try:
        text = bytes(raw_bytes).decode('utf-8')
    except UnicodeDecodeError as exc:
        raise InvalidMachineError('(document)', 'not valid UTF-8 (%s at byte %d)' % (exc.reason, exc.start))
    _check_depth(text, MAX_JSON_DEPTH)
    try:
        data = json.loads(text, object_pairs_hook=_object_without_duplicates,
                          parse_constant=_reject_constant)
    except ValueError as exc:
        # JSONDecodeError, and ValueError for integers past the int/str
        # conversion limit.
        raise InvalidMachineError('(document)', 'not valid JSON (%s)' % _show_text(str(exc)))
    except RecursionError:
        raise InvalidMachineError('(document)', 'nested too deeply')
    if not isinstance(data, dict):
        raise InvalidMachineError('(document)', 'must be a JSON object (got %s)' % _show(data))
    return migrate_machine(data)


def dump_machine_json(machine):
    """Canonical bytes of a machine: validated, sorted keys, 2-space indent,
    trailing newline.  The same machine always gives the same bytes."""
    machine = validate_machine(machine)
    return (json.dumps(machine, sort_keys=True, indent=2, separators=(',', ': '),
                       allow_nan=False) + '\n').encode('utf-8')


def apply_defaults(machine):
    """Validated copy of a version-1 machine with MACHINE_DEFAULTS filled in
    for missing fields.  uuid and mac are never filled in."""
    result = validate_machine(machine)
    for name, value in MACHINE_DEFAULTS.items():
        if name not in result:
            result[name] = list(value) if isinstance(value, list) else value
    return validate_machine(result)


def merge_machine(base, overrides):
    """Validated copy of base updated with overrides; an override of None
    removes the field.  ``version`` cannot be changed."""
    if not isinstance(base, dict):
        raise InvalidMachineError('(document)', 'must be a JSON object (got %s)' % _show(base))
    if not isinstance(overrides, dict):
        raise InvalidMachineError('(overrides)', 'must be an object (got %s)' % _show(overrides))
    if 'version' in overrides:
        version = overrides['version']
        if not (_is_int(version) and version == MACHINE_SCHEMA_VERSION):
            raise InvalidMachineError(
                'version', 'cannot be changed by an override (got %s)' % _show(version))
    result = dict(base)
    for name, value in overrides.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return validate_machine(result)


def random_mac(rng=None):
    """A random locally administered unicast MAC ('x2:xx:xx:xx:xx:xx' form).

    rng: optional random.Random-like object (for tests); default os.urandom.
    """
    if rng is None:
        octets = bytearray(os.urandom(6))
    else:
        octets = bytearray(rng.getrandbits(48).to_bytes(6, 'big'))
    octets[0] = (octets[0] | 0x02) & 0xfe
    return ':'.join('%02x' % b for b in octets)


def random_uuid():
    """A random (version 4) UUID string."""
    return str(uuid.uuid4())
