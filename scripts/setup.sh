#!/usr/bin/env bash
# Create ./.venv with cpq (editable) and everything the notebooks and tests need, at the versions of
# requirements.lock (every package pinned; made by scripts/lock.sh). Idempotent: a stamp of
# pyproject.toml + the lock makes a re-run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CPQ_VENV:-.venv}"
python="${PYTHON:-python3}"
constraints="${CPQ_CONSTRAINTS:-requirements.lock}"
stamp="$venv/.cpq-setup"
want="$(cat pyproject.toml "$constraints" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
echo "setting up $venv (first run: a few minutes) ..." >&2
# a set-up killed half-way can leave a venv without pip: make a fresh one
if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip --version >/dev/null 2>&1; }; then
  "$python" -m venv --clear "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" -e ".[dev]" 2>&1 \
  | grep -v '^WARNING: Location' >&2 || true
"$venv/bin/python" -c "import cpq_lib, torch, torchvision, papermill, nbval" \
  || { echo "set-up failed: cpq_lib or a dependency does not import" >&2; exit 1; }
"$venv/bin/python" -c "
import sys
from cpq_lib.lock import lock_status
status = lock_status()
if not status.startswith('matches'):
    print(f'warning: the environment {status}; results may differ from the stored notebooks', file=sys.stderr)
"
echo "$want" > "$stamp"
