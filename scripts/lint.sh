#!/usr/bin/env bash
# ansible-lint (production profile, offline) over the roles, the demo
# playbooks and the molecule scenarios.  Sets the machine up first
# (scripts/bootstrap.sh); exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

# Offline, ansible-lint does not install the checkout as a collection, so
# vmimage.qemu.* resolves through the tree the tests use.
# shellcheck source=scripts/checkout_collection.sh
source scripts/checkout_collection.sh

targets=(roles)
for path in demo molecule; do
  if [ -d "$path" ] && [ -n "$(find "$path" -name '*.yml' -print -quit)" ]; then
    targets+=("$path")
  fi
done
exec ansible-lint --offline --profile production "${targets[@]}"
