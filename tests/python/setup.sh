#!/usr/bin/env bash
# Creates the Python venv that the integration tests run their Python clients in, with the
# packages pinned in requirements.txt. Idempotent: a stamp holding the hash of the
# requirements and of the interpreter makes a second run return at once.
#
# Usage: tests/python/setup.sh [VENV_DIR]
#   VENV_DIR defaults to ${CARGO_TARGET_DIR:-target}/python-venv; the interpreter is
#   $PYTHON, else python3.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-${CARGO_TARGET_DIR:-$root/target}/python-venv}"
python="${PYTHON:-python3}"
requirements="$here/requirements.txt"
stamp="$venv/.tollgate-requirements.sha256"

command -v "$python" >/dev/null || { echo "setup.sh: $python not found; install Python 3 (with venv)" >&2; exit 1; }
want="$({ cat "$requirements"; "$python" -c 'import sys; print(sys.executable, sys.version)'; } | sha256sum | cut -d' ' -f1)"

mkdir -p "$(dirname "$venv")"
# Two test runs starting at once must not build the same venv together.
exec 9>"$venv.lock"
flock 9

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c '' 2>/dev/null; then
  echo "python venv up to date: $venv"
  exit 0
fi

echo "python venv: creating $venv from $requirements"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --requirement "$requirements"
# Written last, so an interrupted install is redone from scratch next time.
echo "$want" >"$stamp"
"$venv/bin/python" -m pip freeze --disable-pip-version-check | sed 's/^/  /'
