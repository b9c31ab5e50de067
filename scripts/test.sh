#!/usr/bin/env bash
# The whole test suite: unit tests, then nbval on the stored notebooks. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${CPQ_VENV:-.venv}/bin/python" -m pytest tests notebooks --nbval-lax --nbval-current-env "$@"
