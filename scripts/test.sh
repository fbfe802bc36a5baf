#!/usr/bin/env bash
# Run every test; this is what CI runs.  Sets the machine up first
# (scripts/bootstrap.sh), then runs each stage to its end and reports them all:
#   pytest     library, interop with GNU tar/zstd/qemu, attack corpus, downloads
#              against a loopback server, the modules and roles through
#              ansible-playbook, docs freshness, galaxy build, the demo
#   lint       ansible-lint, production profile (scripts/lint.sh)
#   sanity     ansible-test sanity and units (scripts/sanity.sh)
#   molecule   every molecule scenario, verified with testinfra (scripts/molecule.sh)
# With arguments, only pytest runs, with those arguments
# (e.g. `bash scripts/test.sh tests/unit -k qcow2`).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bash scripts/bootstrap.sh || exit 1

if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -p no:cacheprovider -q "$@"
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -E"
stages=(pytest lint sanity molecule)
declare -A status seconds
for stage in "${stages[@]}"; do
  echo "=== test.sh: $stage"
  start=$SECONDS
  case "$stage" in
    pytest) .venv/bin/python -m pytest -p no:cacheprovider -q tests ;;
    lint) bash scripts/lint.sh ;;
    sanity) bash scripts/sanity.sh ;;
    molecule) $SUDO bash scripts/molecule.sh ;;
  esac
  status[$stage]=$?
  seconds[$stage]=$((SECONDS - start))
done

failed=0
echo "=== test.sh summary"
for stage in "${stages[@]}"; do
  if [ "${status[$stage]}" -eq 0 ]; then word=passed; else word="FAILED (exit ${status[$stage]})"; failed=1; fi
  printf '  %-9s %-20s %4d s\n' "$stage" "$word" "${seconds[$stage]}"
done
exit "$failed"
