#!/usr/bin/env bash
# ansible-lint (production profile, offline) over the roles, the demo
# playbooks and the molecule scenarios.  Sets the machine up first
# (scripts/bootstrap.sh); exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

# Offline, ansible-lint does not install the checkout as a collection, so
# vmimage.qemu.* resolves through the same ansible_collections tree the tests
# use (tests/conftest.py makes it): build/collections/.../vmimage/qemu -> here.
link=build/collections/ansible_collections/vmimage/qemu
if [ ! -L "$link" ]; then
  mkdir -p "$(dirname "$link")"
  ln -s "$PWD" "$link"
fi
export ANSIBLE_COLLECTIONS_PATH="$PWD/build/collections"
export PATH="$PWD/.venv/bin:$PATH"

targets=(roles)
for path in demo molecule; do
  if [ -d "$path" ] && [ -n "$(find "$path" -name '*.yml' -print -quit)" ]; then
    targets+=("$path")
  fi
done
exec ansible-lint --offline --profile production "${targets[@]}"
