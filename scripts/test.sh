#!/usr/bin/env bash
# The whole test suite: unit tests, then nbval on the stored notebooks, then a check that the figures
# those notebook runs wrote equal the committed figures/quick/ byte for byte. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
python="${CPQ_VENV:-.venv}/bin/python"
# the documentation site's tools, for tests/test_docs.py (pinned; a no-op once installed)
"$python" -m pip install --quiet --disable-pip-version-check -r docs/requirements.txt 2>&1 | grep -v '^WARNING: Location' >&2 || true
figures="$(mktemp -d)"
trap 'rm -rf "$figures"' EXIT
status=0
CPQ_FIGURES_DIR="$figures" "$python" -m pytest tests notebooks --nbval-lax --nbval-current-env "$@" || status=$?
"$python" scripts/compare_figures.py "$figures" || status=$(( status == 0 ? 1 : status ))
exit "$status"
