#!/usr/bin/env bash
# Run `molecule test` for every scenario under molecule/ (or only those named:
# `bash scripts/molecule.sh ssh`).  Sets the machine up first
# (scripts/bootstrap.sh), makes the checkout importable as the collection
# vmimage.qemu, then runs each scenario to its end (molecule's test sequence
# always finishes with destroy), prints how long each took and exits non-zero
# when any failed.  Needs root: the roles install packages and the ssh
# scenario creates a user and starts its own sshd.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/molecule.sh: run as root (the scenarios install packages, add a user, start sshd)" >&2
  exit 2
fi
bash scripts/bootstrap.sh

# The checkout is the collection vmimage.qemu (the tree the tests use).
# shellcheck source=scripts/checkout_collection.sh
source scripts/checkout_collection.sh
# Scenarios live in molecule/ (not extensions/molecule/, where molecule looks
# first inside a collection).
export MOLECULE_GLOB="molecule/*/molecule.yml"
export ANSIBLE_FORCE_COLOR="${ANSIBLE_FORCE_COLOR:-0}"
export PY_COLORS="${PY_COLORS:-0}"

if [ "$#" -gt 0 ]; then
  scenarios=("$@")
else
  scenarios=()
  for file in molecule/*/molecule.yml; do
    scenarios+=("$(basename "$(dirname "$file")")")
  done
fi

declare -A status seconds
failed=0
for scenario in "${scenarios[@]}"; do
  echo "=== molecule test -s $scenario"
  start=$SECONDS
  if molecule test --destroy=always -s "$scenario"; then
    status[$scenario]=passed
  else
    status[$scenario]="FAILED"
    failed=1
  fi
  seconds[$scenario]=$((SECONDS - start))
done

echo "=== molecule summary"
for scenario in "${scenarios[@]}"; do
  printf '%-10s %-7s %4d s\n' "$scenario" "${status[$scenario]}" "${seconds[$scenario]}"
done
exit "$failed"
