#!/usr/bin/env bash
# Command (a): set up, start a local Ray head, submit the order sweep as a Ray job, stream
# its logs, print where the report is, and stop the head this script started.
#   bash infra/quickstart.sh [config overrides, e.g. grid.seed=[0]]
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
source .venv/bin/activate  # the job's `python` is this environment's
export RAY_AUTH_MODE=token  # token auth stays on; the head writes ~/.ray/auth_token
gcs_port=${RAY_GCS_PORT:-6390}
dash_port=${RAY_DASHBOARD_PORT:-8265}
results=${RAYTRAIN_RESULTS:-$PWD/results}
ray start --head --port="$gcs_port" --dashboard-host=127.0.0.1 --dashboard-port="$dash_port" --disable-usage-stats
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
echo "raytrain: Ray dashboard at http://127.0.0.1:$dash_port"
ray job submit --address "http://127.0.0.1:$dash_port" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", "results", ".git"]}' \
  -- python jobs/order_sweep.py "run.storage_path=$results" "$@"
report=$(ls -t "$results"/order_sweep-*/report.md | head -1)
echo "raytrain: the sweep report is $report"
