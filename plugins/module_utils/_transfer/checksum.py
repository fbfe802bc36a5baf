# -*- coding: utf-8 -*-
# Copyright: vmimage.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!
"""Checksum specifications: parsing, checksum files, constant-time comparison.

A specification is ``<algorithm>:<hex digest>`` or ``<algorithm>:<URL>`` where
the URL (http://, https:// or file://) names a checksum file, the forms
``ansible.builtin.get_url`` accepts.  sha256 and sha512 are recommended;
md5, sha1, sha224 and sha384 are accepted so existing playbooks keep working,
but md5 and sha1 no longer protect against a deliberate substitution.

A checksum file fetched from the same server as the image only guards against
corruption in transit; against tampering it must come from a source the
attacker does not control (or be pinned as a hex digest in the playbook).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import collections
import hmac
import posixpath
import re

from urllib.parse import unquote, urlsplit

from ansible_collections.vmimage.qemu.plugins.module_utils._transfer.download import (
    open_download as _default_open_download,
    read_all,
    redact_url,
)
from ansible_collections.vmimage.qemu.plugins.module_utils._core.errors import (
    ChecksumMismatchError,
    DownloadError,
    InvalidOptionError,
)

# Hex digits per algorithm.
DIGEST_LENGTHS = {
    'md5': 32,
    'sha1': 40,
    'sha224': 56,
    'sha256': 64,
    'sha384': 96,
    'sha512': 128,
}
RECOMMENDED_ALGORITHMS = ('sha256', 'sha512')

# Checksum files are a few lines each; anything bigger is not one.
MAX_CHECKSUM_FILE = 1024 * 1024

_HEX_RE = re.compile(r'^[0-9a-fA-F]+$')
_URL_RE = re.compile(r'^(?i:https?|file)://')
# BSD style (``sha256sum --tag``, OpenSSL, Fedora CHECKSUM): SHA256 (name) = hex
_BSD_RE = re.compile(r'^(?P<algo>[A-Za-z0-9-]+) ?\((?P<name>.*)\) ?= ?(?P<hex>[0-9a-fA-F]+)$')
# GNU coreutils style: hex, one space, ' ' (text) or '*' (binary), name.
# Files written by hand often have a single space, hence \s+ and an optional *.
_GNU_RE = re.compile(r'^(?P<hex>[0-9a-fA-F]+)\s+\*?(?P<name>.+)$')


# What every message about a malformed specification ends with.
ACCEPTED_FORMS = ('the checksum option takes <algorithm>:<hex digest> or <algorithm>:<URL of a checksum file> '
                  '(http://, https:// or file://), with <algorithm> one of %s (sha256 or sha512 recommended)'
                  % ', '.join(sorted(DIGEST_LENGTHS)))


class ChecksumSpecError(InvalidOptionError):
    """A checksum specification that is not ``<algorithm>:<hex or URL>``
    (an InvalidOptionError, hence also a ValueError)."""


class ChecksumSpec(collections.namedtuple('ChecksumSpec', 'algorithm hexdigest url')):
    """A parsed specification: ``hexdigest`` (lowercase) or ``url`` may be None."""

    __slots__ = ()

    def __str__(self):
        if self.hexdigest is not None:
            return '%s:%s' % (self.algorithm, self.hexdigest)
        return '%s:%s' % (self.algorithm, redact_url(self.url))


def parse_checksum(spec):
    """Parse ``sha256:<hex>`` / ``sha512:<URL>`` ... into a ChecksumSpec.

    The algorithm is case-insensitive, the digest is checked for its length
    and lowercased.  Anything else raises ChecksumSpecError (a ValueError).
    An existing ChecksumSpec is returned unchanged.
    """
    if isinstance(spec, ChecksumSpec):
        return spec
    if not isinstance(spec, str) or ':' not in spec:
        raise ChecksumSpecError('invalid checksum %s: no algorithm; %s' % (_shown(spec), ACCEPTED_FORMS))
    algorithm, dummy, value = spec.strip().partition(':')
    algorithm = algorithm.strip().lower()
    value = value.strip()
    if algorithm not in DIGEST_LENGTHS:
        raise ChecksumSpecError('invalid checksum %s: unsupported checksum algorithm %r; %s'
                                % (_shown(spec), algorithm, ACCEPTED_FORMS))
    if _URL_RE.match(value):
        return ChecksumSpec(algorithm, None, value)
    _check_hex(algorithm, value, 'invalid checksum %s' % (_shown(spec),))
    return ChecksumSpec(algorithm, value.lower(), None)


def _shown(spec):
    """The specification as messages quote it: without credentials, cut short."""
    if not isinstance(spec, str):
        return repr(spec)
    text = redact_url(spec)
    return repr(text if len(text) <= 200 else text[:200] + '...')


def _check_hex(algorithm, value, what):
    expected = DIGEST_LENGTHS[algorithm]
    if not _HEX_RE.match(value):
        raise ChecksumSpecError('%s: the digest must be %d hex digits or a URL (http://, https://, file://); %s'
                                % (what, expected, ACCEPTED_FORMS))
    if len(value) != expected:
        raise ChecksumSpecError('%s: a %s digest has %d hex digits, not %d; %s'
                                % (what, algorithm, expected, len(value), ACCEPTED_FORMS))


def _target_name(target_url):
    """Basename of the target's path, which checksum files list entries by."""
    path = urlsplit(target_url).path if '://' in target_url else target_url
    name = posixpath.basename(unquote(path))
    if not name:
        raise ChecksumSpecError('checksum: cannot look up %s in a checksum file: its URL names no file; '
                                'give the digest itself (<algorithm>:<hex digest>)' % redact_url(target_url))
    return name


def _gnu_unescape(name):
    # coreutils marks a line whose name holds '\\' or a newline with a leading
    # backslash and escapes them as '\\\\' and '\\n'.
    return re.sub(r'\\(.)', lambda m: '\n' if m.group(1) == 'n' else m.group(1), name)


def _entries(text, algorithm):
    """(name, hex) pairs of a checksum file, for this algorithm's BSD lines and all GNU lines."""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        escaped = line.startswith('\\')
        if escaped:
            line = line[1:]
        match = _BSD_RE.match(line)
        if match:
            # BSD lines name their algorithm; files may hold several (MD5 and
            # SHA256 lines for the same name): only ours counts.
            if match.group('algo').replace('-', '').lower() == algorithm:
                name = match.group('name')
                yield (_gnu_unescape(name) if escaped else name), match.group('hex')
            continue
        match = _GNU_RE.match(line)
        if match:
            name = match.group('name')
            yield (_gnu_unescape(name) if escaped else name), match.group('hex')


def find_digest(text, algorithm, name, source='checksum file'):
    """The lowercase hex digest for ``name`` in a checksum file's text.

    Entries match on their name, with ``./`` and any directory removed.
    A file holding nothing but one bare digest applies to any name.  Raises
    DownloadError when there is no entry, when entries disagree, or when
    the entry's digest has the wrong length for the algorithm.
    """
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith('#')]
    if len(lines) == 1 and _HEX_RE.match(lines[0]):
        found = [lines[0]]
    else:
        found = [hexdigest for entry, hexdigest in _entries(text, algorithm)
                 if posixpath.basename(entry) == name]
    if not found:
        raise DownloadError('%s has no %s entry for %s' % (source, algorithm, name))
    digests = set(d.lower() for d in found)
    if len(digests) > 1:
        raise DownloadError('%s has conflicting %s entries for %s' % (source, algorithm, name))
    digest = digests.pop()
    if len(digest) != DIGEST_LENGTHS[algorithm]:
        raise DownloadError('%s: the entry for %s has %d hex digits, a %s digest has %d'
                            % (source, name, len(digest), algorithm, DIGEST_LENGTHS[algorithm]))
    return digest


def resolve_checksum(spec, target_url, open_download=None, **download_kw):
    """Return ``spec`` with its hexdigest filled in, fetching its checksum file if needed.

    ``target_url`` is the URL of the content being checked: its basename is
    the name looked up.  The checksum file is read through ``open_download``
    (default: download.open_download; keyword arguments such as credentials
    or validate_certs are passed on) and may be at most 1 MiB.

    Credentials and headers are the target's: they reach the checksum file
    only when it is on the target's origin (``credentials_origin`` defaults
    to ``target_url``), so a checksum published elsewhere never sees them.
    """
    spec = parse_checksum(spec)
    if spec.hexdigest is not None:
        return spec
    name = _target_name(target_url)
    if open_download is None:
        open_download = _default_open_download
    download_kw.setdefault('credentials_origin', target_url)
    download_kw.setdefault('hash_algorithms', ())
    download_kw['max_bytes'] = min(download_kw.get('max_bytes') or MAX_CHECKSUM_FILE, MAX_CHECKSUM_FILE)
    with open_download(spec.url, **download_kw) as stream:
        data = read_all(stream)
    text = data.decode('utf-8', 'replace')
    return ChecksumSpec(spec.algorithm,
                        find_digest(text, spec.algorithm, name, 'checksum file %s' % redact_url(spec.url)),
                        spec.url)


def digest_matches(expected_hex, actual_hex):
    """Compare two hex digests in constant time (case-insensitive)."""
    try:
        expected = expected_hex.strip().lower().encode('ascii')
        actual = actual_hex.strip().lower().encode('ascii')
    except (AttributeError, UnicodeError):
        return False
    return hmac.compare_digest(expected, actual)


def verify_digest(spec, actual_hex, url):
    """Raise ChecksumMismatchError unless ``actual_hex`` is the resolved ``spec``'s digest."""
    spec = parse_checksum(spec)
    if spec.hexdigest is None:
        # A programming error, not an option value: no ChecksumSpecError.
        raise ValueError('checksum %s is not resolved yet (call resolve_checksum)' % (spec,))
    if not digest_matches(spec.hexdigest, actual_hex):
        raise ChecksumMismatchError('checksum mismatch for %s: expected %s:%s, got %s:%s'
                                    % (redact_url(url), spec.algorithm, spec.hexdigest,
                                       spec.algorithm, actual_hex))
