#!/usr/bin/env bash
# Make requirements.lock: every package scripts/setup.sh installs, transitive ones included, pinned.
# Inputs: pyproject.toml (dependencies and the dev extra) and constraints.txt (hand-kept pins, e.g. the
# tested torch). Tool: uv's `pip compile`, universal (markers for every platform and Python the project
# allows) with one version per package, installed into a throw-away folder. Run it after changing
# either input; tests/test_lock.py fails until you do.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
tools="${TMPDIR:-/tmp}/cpq-lock-tools"
uv_version="0.13.9"
if ! "$tools/bin/uv" --version 2>/dev/null | grep -q "uv $uv_version"; then
  "$python" -m venv --clear "$tools"
  "$tools/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$uv_version"
fi
digest="$("$python" -c 'import sys; sys.path.insert(0, "."); from cpq_lib.lock import inputs_digest; print(inputs_digest())')"
tmp="$(mktemp requirements.lock.XXXXXX)"
trap 'rm -f "$tmp"' EXIT
# pip: the installer setup.sh upgrades first, pinned with everything else
printf 'pip\n' | "$tools/bin/uv" pip compile pyproject.toml - --extra dev -c constraints.txt --universal \
  --fork-strategy fewest --no-header --quiet -o "$tmp"
{
  echo "# Every package scripts/setup.sh installs, pinned. Made by scripts/lock.sh (uv $uv_version pip compile --universal"
  echo "# --fork-strategy fewest) from pyproject.toml and constraints.txt; do not edit by hand."
  echo "# inputs sha256: $digest"
  cat "$tmp"
} > requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) pins)"
