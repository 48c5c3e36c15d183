#!/usr/bin/env bash
# Command (b): set up and run the test suite (pytest arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
exec .venv/bin/python -m pytest "$@"
