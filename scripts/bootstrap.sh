#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for the collection: system packages
# (qemu-utils, qemu-system-x86, zstd, GNU tar, python3-venv) and a virtualenv
# in .venv with the Python requirements.  Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

# mmdebstrap, syslinux, mtools, dosfstools, e2fsprogs and fdisk build the real
# Debian guest that tests/integration/test_linux_guest.py boots.
APT_PACKAGES=(qemu-utils qemu-system-x86 zstd tar python3 python3-venv python3-pip openssh-server openssh-client sudo
              mmdebstrap syslinux syslinux-common mtools dosfstools e2fsprogs fdisk)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "bootstrap: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  rm -f .venv/.requirements-*
  touch "$stamp"
fi
