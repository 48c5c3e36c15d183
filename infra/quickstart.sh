#!/usr/bin/env bash
# Command (a): set up, start a private local Ray head, submit the order sweep as a Ray job, stream
# its logs, print where the report is, and stop the head this script started (and nothing else).
#   bash infra/quickstart.sh [config overrides, e.g. grid.seed=[0]]
# Ports: RAY_GCS_PORT (6390) and RAY_DASHBOARD_PORT (8265); results under RAYTRAIN_RESULTS (./results).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
source .venv/bin/activate # the job's `python` is this environment's
say() { echo "raytrain: $*"; }

# Token authentication stays on. A fresh machine has no token yet: create one (Ray's own format,
# ~/.ray/auth_token, readable by this user only); `ray get-auth-token` prints it, so discard that.
export RAY_AUTH_MODE=token
if ! ray get-auth-token >/dev/null 2>&1; then
  (umask 077 && ray get-auth-token --generate >/dev/null 2>&1)
  chmod 600 "$HOME/.ray/auth_token"
  say "created a Ray authentication token in ~/.ray/auth_token"
fi

gcs_port=${RAY_GCS_PORT:-6390}
dash_port=${RAY_DASHBOARD_PORT:-8265}
results=${RAYTRAIN_RESULTS:-$PWD/results}
for port in "$gcs_port" "$dash_port"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    say "error: port $port on 127.0.0.1 is in use (a Ray head already running? \`ray status\` tells)." >&2
    say "stop it, or pick free ports: RAY_GCS_PORT=<port> RAY_DASHBOARD_PORT=<port> bash infra/quickstart.sh" >&2
    exit 1
  fi
done
# Ray's other fixed default ports (client server 10001, dashboard agent 52365) would collide with
# another head on this machine: take free ones.
read -r client_port agent_port < <(python -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

# The head runs in the foreground of its own session (`--block`), in a private temp dir: stopping
# that one process stops every Ray process it started, and no other Ray cluster on this machine is
# touched (`ray stop` would stop them all). Its processes inherit RAY_ADDRESS: Ray Train looks its
# actors up by "the" local cluster, which fails when this machine runs another one.
ray_tmp=$(mktemp -d /tmp/raytrain-ray-XXXXXX)
head_log="$ray_tmp/head.log"
RAY_ADDRESS="127.0.0.1:$gcs_port" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 setsid ray start --head --block --temp-dir="$ray_tmp" --port="$gcs_port" --dashboard-host=127.0.0.1 \
  --dashboard-port="$dash_port" --ray-client-server-port="$client_port" \
  --dashboard-agent-listen-port="$agent_port" --disable-usage-stats >"$head_log" 2>&1 &
head_pid=$!
stop_head() {
  kill -TERM "$head_pid" 2>/dev/null || return 0
  for _ in $(seq 60); do kill -0 "$head_pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$head_pid" 2>/dev/null || true # its whole process group, if it did not stop in 30 s
  wait "$head_pid" 2>/dev/null || true
  rm -rf "$ray_tmp"
}
trap stop_head EXIT

address="http://127.0.0.1:$dash_port"
for i in $(seq 240); do
  if ! kill -0 "$head_pid" 2>/dev/null; then
    say "error: the Ray head did not start; its log:" >&2
    tail -30 "$head_log" >&2
    exit 1
  fi
  ray job list --address "$address" >/dev/null 2>&1 && break
  [ "$i" = 240 ] && { say "error: the Ray head did not answer on $address within 2 min; log: $head_log" >&2; exit 1; }
  sleep 0.5
done
say "Ray dashboard at $address (stopped when this script ends)"

# The head answers before its job agent is up ("No available agent to submit job"): retry that.
job="raytrain-order-sweep-$(date +%Y%m%d-%H%M%S)"
submit=(ray job submit --address "$address" --submission-id "$job" --no-wait --working-dir .
  --runtime-env-json '{"excludes": [".venv", "results", ".git"]}'
  -- python jobs/order_sweep.py "run.storage_path=$results" "$@")
for i in $(seq 60); do
  out=$("${submit[@]}" 2>&1) && break
  if [[ "$out" != *"No available agent"* || "$i" = 60 ]]; then
    echo "$out" >&2
    exit 1
  fi
  sleep 2
done
ray job logs --address "$address" --follow "$job"
status=$(ray job status --address "$address" "$job" 2>&1 || true)
if [[ "$status" != *"Job '$job' succeeded"* ]]; then
  say "error: job $job did not succeed; its log is above (\`ray job status\` says why)" >&2
  exit 1
fi
report=$(ls -t "$results"/order_sweep-*/report.md | head -1)
say "the sweep report is $report"
