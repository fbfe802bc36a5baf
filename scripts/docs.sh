#!/usr/bin/env bash
# The collection's generated documentation and changelog tooling.
#
#   scripts/docs.sh                    regenerate docs/reference/ (antsibull-docs)
#   scripts/docs.sh --check            fail when docs/reference/ is stale, when
#                                      antsibull-docs' linter or antsibull-changelog's
#                                      linters complain, or when the pending changelog
#                                      fragments do not render
#   scripts/docs.sh --changelog-preview
#                                      print the changelog the next release would get
#
# docs/reference/ holds exactly what antsibull-docs writes (nothing is edited
# afterwards), so --check can compare it byte for byte with a fresh run.
# Modules, their doc fragments and every role with meta/argument_specs.yml
# are picked up from the collection itself.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

mode=generate
case "${1:-}" in
  '') ;;
  --check) mode=check ;;
  --changelog-preview) mode=preview ;;
  *) echo "usage: $0 [--check | --changelog-preview]" >&2; exit 2 ;;
esac

bash scripts/bootstrap.sh

# antsibull-docs documents installed collections only: make the checkout one.
# shellcheck source=scripts/checkout_collection.sh
source scripts/checkout_collection.sh
export ANSIBLE_NOCOLOR=1

REFERENCE=docs/reference
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

generate() {
  # --no-add-antsibull-docs-version keeps the output free of tool versions;
  # --cleanup everything removes pages of plugins or roles that are gone.
  mkdir -p "$1"
  antsibull-docs collection --use-current --squash-hierarchy \
    --output-format simplified-rst --no-add-antsibull-docs-version \
    --fail-on-error --cleanup everything --dest-dir "$1" vmimage.qemu >"$WORK/antsibull-docs.log" 2>&1 || {
      cat "$WORK/antsibull-docs.log" >&2
      echo "docs.sh: antsibull-docs could not document the collection (see above)" >&2
      return 1
    }
}

# A copy of what antsibull-changelog reads, with the pending fragments released
# under galaxy.yml's version, so rendering them never touches the checkout.
render_changelog() {
  local copy="$WORK/changelog-preview" version
  mkdir -p "$copy"
  cp -r galaxy.yml changelogs meta plugins "$copy/"
  if [ -d roles ]; then cp -r roles "$copy/"; fi
  rm -f "$copy/changelogs/.plugin-cache.yaml"
  version=$(python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["version"])' galaxy.yml)
  (cd "$copy" && antsibull-changelog release --version "$version" --date 1970-01-01 \
      && antsibull-changelog generate --output "$WORK/CHANGELOG.preview.md" --output-format md) \
    >"$WORK/changelog.log" 2>&1 || {
      cat "$WORK/changelog.log" >&2
      echo "docs.sh: the pending changelog fragments do not render as release $version" >&2
      return 1
    }
}

pending_fragments() {
  compgen -G 'changelogs/fragments/*.yml' >/dev/null || compgen -G 'changelogs/fragments/*.yaml' >/dev/null
}

if [ "$mode" = generate ]; then
  generate "$REFERENCE"
  echo "docs.sh: $REFERENCE regenerated ($(find "$REFERENCE" -type f | wc -l) files, antsibull-docs $(antsibull-docs --version | awk '{print $NF}'))"
  exit 0
fi

if [ "$mode" = preview ]; then
  if ! pending_fragments; then
    echo "docs.sh: no pending changelog fragments" >&2
    exit 0
  fi
  render_changelog
  cat "$WORK/CHANGELOG.preview.md"
  exit 0
fi

# --check: run every check, report all failures, then fail.
failures=()

generate "$WORK/reference" || failures+=("antsibull-docs collection")
if [ -d "$WORK/reference" ] && [ -n "$(ls -A "$WORK/reference")" ]; then
  if [ ! -d "$REFERENCE" ]; then
    echo "docs.sh: $REFERENCE does not exist; run: bash scripts/docs.sh" >&2
    failures+=("$REFERENCE missing")
  elif ! diff -r -q "$REFERENCE" "$WORK/reference" >"$WORK/summary" 2>&1; then
    {
      echo "docs.sh: $REFERENCE is stale; run: bash scripts/docs.sh"
      echo "(generated with antsibull-docs $(antsibull-docs --version | awk '{print $NF}'))"
      sed -e "s#$WORK/reference#<regenerated>#g" "$WORK/summary"
      diff -r -u "$REFERENCE" "$WORK/reference" | sed -e "s#$WORK/reference#<regenerated>#g" | head -n 80 || true
    } >&2
    failures+=("$REFERENCE stale")
  fi
fi

# The linter renders every plugin and role page in antsibull-docs' default
# format too and runs rstcheck on it: markup mistakes in DOCUMENTATION
# (an unbalanced C(...), a broken O(...) reference) show up here.
if ! antsibull-docs lint-collection-docs --plugin-docs --validate-collection-refs all \
    --disallow-unknown-collection-refs "$REPO/build/collections/ansible_collections/vmimage/qemu" >"$WORK/lint.log" 2>&1; then
  cat "$WORK/lint.log" >&2
  echo "docs.sh: antsibull-docs lint-collection-docs failed (see above)" >&2
  failures+=("antsibull-docs lint-collection-docs")
fi

if ! antsibull-changelog lint >"$WORK/changelog-lint.log" 2>&1 || [ -s "$WORK/changelog-lint.log" ]; then
  cat "$WORK/changelog-lint.log" >&2
  echo "docs.sh: antsibull-changelog lint found problems in changelogs/fragments (see above)" >&2
  failures+=("antsibull-changelog lint")
fi
if ! antsibull-changelog lint-changelog-yaml changelogs/changelog.yaml >"$WORK/changelog-yaml.log" 2>&1 \
    || [ -s "$WORK/changelog-yaml.log" ]; then
  cat "$WORK/changelog-yaml.log" >&2
  echo "docs.sh: antsibull-changelog lint-changelog-yaml found problems (see above)" >&2
  failures+=("antsibull-changelog lint-changelog-yaml")
fi
if pending_fragments; then
  render_changelog || failures+=("changelog preview")
fi

if [ "${#failures[@]}" -gt 0 ]; then
  summary=$(printf '%s, ' "${failures[@]}")
  echo "docs.sh --check failed: ${summary%, }" >&2
  exit 1
fi
echo "docs.sh --check: docs/reference is current; antsibull-docs and antsibull-changelog linters are clean"
