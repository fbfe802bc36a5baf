#!/usr/bin/env bash
# The main job on an embedded default: sets the machine up (scripts/bootstrap.sh),
# then packs a generated image, serves it on 127.0.0.1, fetches it with
# vmimage.qemu.vm_image_fetch into a store in a temporary folder, and reports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python demo/run_demo.py "$@"
