#!/usr/bin/env bash
# Build the documentation site (README, docs/, the stored notebooks rendered without executing them)
# into site/ or the folder given; `--serve` browses it live. Installs the pinned site tools first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
python="${CPQ_VENV:-.venv}/bin/python"
"$python" -m pip install --quiet --disable-pip-version-check -r docs/requirements.txt 2>&1 | grep -v '^WARNING: Location' >&2 || true
exec "$python" scripts/build_docs.py "$@"
