#!/usr/bin/env bash
# The main job on an embedded default.  Sets the machine up (scripts/bootstrap.sh:
# Debian packages and .venv), then: builds a tiny bootable image with
# vmimage.qemu.vm_image_package, serves it on 127.0.0.1, applies the hypervisor
# and image_cache roles to localhost with the store in a temporary folder,
# creates two instances, boots one under QEMU and shows its serial marker, and
# prints the store's state.  Leaves nothing running and nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python demo/run_demo.py "$@"
