#!/usr/bin/env bash
# Command (b): set up and run the test suite (pytest arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
# Headless Chromium for tests/test_report.py, which renders report.html: Debian's package
# (a test tool's own browser download cannot work offline). Installing needs root (CI is);
# only the tests need it, so command (a) does not install it.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "raytrain: installing chromium (apt-get) for the report rendering test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
  else
    echo "raytrain: chromium missing; as root run: apt-get install chromium (tests/test_report.py needs it)" >&2
  fi
fi
# Two pytest workers (pytest-xdist), a module at a time, the modules that start Ray clusters
# first (conftest.py groups and orders them); `-n 0` after the command runs everything in this
# process.
exec .venv/bin/python -m pytest -n 2 --dist loadgroup --no-loadscope-reorder "$@"
