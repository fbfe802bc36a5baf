# shellcheck shell=bash
# Sourced by the scripts that run Ansible tools on this checkout: makes it the
# collection vmimage.qemu through the same tree tests/conftest.py and
# demo/run_demo.py use (build/collections/ansible_collections/vmimage/qemu is
# a symlink to the checkout), and puts .venv's tools first on PATH.
# Only that tree: a copy installed elsewhere (site-packages) must not win.
_checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_link="$_checkout/build/collections/ansible_collections/vmimage/qemu"
if [ ! -L "$_link" ]; then
  mkdir -p "$(dirname "$_link")"
  ln -s "$_checkout" "$_link"
fi
export ANSIBLE_COLLECTIONS_PATH="$_checkout/build/collections"
export ANSIBLE_COLLECTIONS_SCAN_SYS_PATH=false
export PATH="$_checkout/.venv/bin:$PATH"
unset _checkout _link
