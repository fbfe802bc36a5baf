#!/usr/bin/env bash
# ansible-test sanity and ansible-test units for the collection, from a plain
# checkout: sets the machine up first (scripts/bootstrap.sh), then runs both
# against a copy of the checkout and exits non-zero if either failed.
#
#   bash scripts/sanity.sh
#
# ansible-test only works from a directory named
# .../ansible_collections/<namespace>/<name>, so the tracked (and untracked but
# not ignored) files are copied into such a tree in a temporary folder, which is
# removed at the end.  ansible-test's --requirements installs its own pinned
# tools into the interpreter running it, so it gets a virtualenv of its own
# (.venv-ansible-test, git-ignored) rather than touching .venv; it uses the same
# base Python and the same ansible-core version as .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

bash scripts/bootstrap.sh

# The shellcheck sanity test is skipped with a mere warning when the program is
# missing, so install it rather than silently not checking the shell scripts.
if ! command -v shellcheck >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "sanity: installing shellcheck"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends shellcheck >/dev/null
fi

ANSIBLE_CORE_VERSION=$(.venv/bin/python -c 'import ansible; print(ansible.__version__)')
AT_VENV="$REPO/.venv-ansible-test"
if [ ! -x "$AT_VENV/bin/python" ]; then
  # venv run from inside .venv bases the new environment on .venv's own base
  # interpreter, so both test environments use the same Python.
  .venv/bin/python -m venv "$AT_VENV"
fi
if [ "$("$AT_VENV/bin/python" -c 'import ansible; print(ansible.__version__)' 2>/dev/null || true)" != "$ANSIBLE_CORE_VERSION" ]; then
  "$AT_VENV/bin/python" -m pip install -q --disable-pip-version-check "ansible-core==$ANSIBLE_CORE_VERSION"
fi
PYVER=$("$AT_VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# ansible-test fills each per-test virtualenv by running a get-pip.py it
# downloads from ci-files.testing.ansible.com, which is unreachable from some
# networks (this CI's included).  It uses ~/.ansible/test/cache/get_pip_<ver>.py
# instead when present, so a stand-in that bootstraps pip from ensurepip is put
# there -- only when missing, so a genuine cached script is never overwritten.
# The pip version comes from ansible-test's own table (it changes between
# ansible-core releases); the grep is the fallback should that internal API move.
PIP_VERSION=$("$AT_VENV/bin/python" - "$PYVER" <<'EOF' 2>/dev/null || true
import sys
import types
from ansible_test._internal.python_requirements import get_venv_packages
print(get_venv_packages(types.SimpleNamespace(version=sys.argv[1]))['pip'])
EOF
)
if [ -z "$PIP_VERSION" ]; then
  AT_REQS=$("$AT_VENV/bin/python" -c 'import ansible_test, os; print(os.path.join(os.path.dirname(ansible_test.__file__), "_internal", "python_requirements.py"))')
  PIP_VERSION=$(sed -n "s/^ *pip='\([0-9.]*\)',.*/\1/p" "$AT_REQS" | head -n 1)
fi
if [ -z "$PIP_VERSION" ]; then
  echo "sanity: cannot tell which pip version ansible-test bootstraps" >&2
  exit 1
fi
GET_PIP_CACHE="$HOME/.ansible/test/cache/get_pip_${PIP_VERSION//./_}.py"
if [ ! -f "$GET_PIP_CACHE" ]; then
  install -D -m 0644 scripts/ansible_test_get_pip.py "$GET_PIP_CACHE"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# mktemp makes the folder 0700; some unit tests import the collection as an
# unprivileged user (nobody), as they do from a normal checkout.
chmod 0755 "$WORK"
TREE="$WORK/ansible_collections/vmimage/qemu"
mkdir -p "$TREE"
# Only what git would commit: local virtualenvs, build/ and old tests/output
# are left behind (they are git-ignored; the case below keeps them out even if
# a local .gitignore lost those lines).  Files deleted but not yet committed
# are skipped.
files=()
while IFS= read -r -d '' f; do
  case "$f" in
    .venv*/* | build/* | tests/output/*) continue ;;
  esac
  if [ -e "$f" ] || [ -L "$f" ]; then
    files+=("$f")
  fi
done < <(git ls-files -z --cached --others --exclude-standard)
cp -P --parents -t "$TREE" -- "${files[@]}"

# An outer ANSIBLE_COLLECTIONS_PATH (tests/conftest.py exports one) would let
# ansible-test find the checkout twice.
unset ANSIBLE_COLLECTIONS_PATH ANSIBLE_COLLECTIONS_PATHS
export PATH="$AT_VENV/bin:$PATH"
cd "$TREE"

status=0
start=$SECONDS
ansible-test sanity --local --requirements --python "$PYVER" || status=1
echo "sanity: ansible-test sanity took $((SECONDS - start)) s"
start=$SECONDS
ansible-test units --local --requirements --python "$PYVER" || status=1
echo "sanity: ansible-test units took $((SECONDS - start)) s"
exit "$status"
