#!/usr/bin/env bash
# Run every test: sets the machine up first (scripts/bootstrap.sh), then the
# pytest suite (library, interop with GNU tar/zstd/qemu, attack corpus,
# downloads against a loopback server, modules through ansible itself).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -p no:cacheprovider -q tests "$@"
