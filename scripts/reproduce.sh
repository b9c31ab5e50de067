#!/usr/bin/env bash
# Run every notebook (default profile: quick) and refresh figures/<profile>/.
# Arguments go to `python -m cpq_lib.runner` (--profile, --data-root, --device, --only, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${CPQ_VENV:-.venv}/bin/python" -m cpq_lib.runner "$@"
