#!/usr/bin/env bash
# The test command (README, and .ci/run calls exactly this): set up if needed, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
