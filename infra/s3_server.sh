#!/usr/bin/env bash
# A local S3-compatible server (moto's) on 127.0.0.1, for tests and local runs.
#
#   eval "$(bash infra/s3_server.sh [start] [PORT])"   # start (port: PORT, $S3_PORT or a free one), print exports
#   bash infra/s3_server.sh stop                         # stop the server this script started
#   bash infra/s3_server.sh status
#
# `start` prints, on stdout and nothing else, the environment that points raytrain (and any
# AWS SDK) at it; progress goes to stderr. Test credentials only: testing/testing, us-east-1.
# The test suite uses a running server when RAYTRAIN_TEST_S3_ENDPOINT is set, else starts its own.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${RAYTRAIN_S3_STATE:-${TMPDIR:-/tmp}/raytrain-s3-server}
PIDFILE=$STATE/moto.pid
LOG=$STATE/moto.log
MOTO=.venv/bin/moto_server
cmd=${1:-start}

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
answers() { .venv/bin/python - "$1" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/moto-api/", timeout=1).read()
except Exception:
    sys.exit(1)
EOF
}
exports() {
  cat <<EOF
export AWS_ENDPOINT_URL=http://127.0.0.1:$1
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export AWS_REGION=us-east-1
export RAYTRAIN_TEST_S3_ENDPOINT=http://127.0.0.1:$1
EOF
}

case "$cmd" in
  start)
    port=${2:-${S3_PORT:-$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}}
    mkdir -p "$STATE"
    if running; then
      port=$(cat "$STATE/port")
      echo "raytrain: S3 server already running (pid $(cat "$PIDFILE"), port $port)" >&2
      exports "$port"
      exit 0
    fi
    [ -x "$MOTO" ] || { echo "raytrain: $MOTO not found; run bash infra/setup.sh (installs moto[server])" >&2; exit 1; }
    if answers "$port"; then
      echo "raytrain: port $port on 127.0.0.1 is already in use; pass another: $0 start PORT" >&2
      exit 1
    fi
    # the server must not inherit the caller's AWS settings
    env -u AWS_ENDPOINT_URL -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY \
      nohup "$MOTO" -H 127.0.0.1 -p "$port" >"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
    echo "$port" >"$STATE/port"
    for _ in $(seq 1 100); do  # up to ~20 s
      if answers "$port"; then
        echo "raytrain: S3 server (moto) on http://127.0.0.1:$port, pid $(cat "$PIDFILE"), log $LOG" >&2
        exports "$port"
        exit 0
      fi
      if ! running; then
        echo "raytrain: the S3 server exited at start; its log ($LOG):" >&2
        tail -20 "$LOG" >&2
        rm -f "$PIDFILE"
        exit 1
      fi
      sleep 0.2
    done
    echo "raytrain: the S3 server did not answer on port $port within 20 s; log: $LOG" >&2
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    rm -f "$PIDFILE"
    exit 1
    ;;
  stop)
    if running; then
      pid=$(cat "$PIDFILE")
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
      echo "raytrain: S3 server (pid $pid) stopped" >&2
    else
      echo "raytrain: no S3 server started by this script is running" >&2
    fi
    rm -f "$PIDFILE" "$STATE/port"
    ;;
  status)
    if running; then
      echo "raytrain: S3 server running: pid $(cat "$PIDFILE"), http://127.0.0.1:$(cat "$STATE/port")" >&2
    else
      echo "raytrain: S3 server not running" >&2
      exit 1
    fi
    ;;
  *)
    echo "usage: $0 [start [PORT] | stop | status]" >&2
    exit 2
    ;;
esac
