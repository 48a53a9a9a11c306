#!/usr/bin/env bash
# Same load (`softmux bench`, default model, the shipped tasks) against three set-ups, one after the other:
#   serve-2t:   softmux serve --threads 2
#   ray-1x1t:   softmux serve-ray --replicas 1 --threads 1
#   ray-2x1t:   softmux serve-ray --replicas 2 --threads 1
# Writes benchmarks/results/ray_<setup>.json and prints each table. Run it alone on the machine
# (e.g. `flock /tmp/softmux-bench.lock deploy/ray/bench.sh`): other CPU work skews every figure.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results}
REQUESTS=${REQUESTS:-64}
CONCURRENCY=${CONCURRENCY:-"8 32"}
NEW=${NEW:-32}
PORT=${PORT:-8311}
export RAY_USAGE_STATS_ENABLED=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

run() {  # name, then the server command
  local name=$1; shift
  echo "== $name: $*" >&2
  "$@" --port "$PORT" > "/tmp/softmux-bench-$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do
    if curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null 2>&1; then break; fi
    kill -0 "$pid" 2>/dev/null || { tail -20 "/tmp/softmux-bench-$name.log"; return 1; }
    sleep 0.5
  done
  # one warm-up request per task (every replica loads its tasks' prefixes), then the load
  $PY -m server.cli bench --url "http://127.0.0.1:$PORT" --requests 14 --concurrency 7 --max-new-tokens 4 --no-progress > /dev/null
  $PY -m server.cli bench --url "http://127.0.0.1:$PORT" --requests "$REQUESTS" --concurrency $CONCURRENCY \
      --max-new-tokens "$NEW" --no-progress --json "$OUT/ray_$name.json"
  curl -s "http://127.0.0.1:$PORT/stats" > "$OUT/ray_$name.stats.json"   # per replica: tasks, requests, passes
  kill -TERM "$pid"; wait "$pid" || true
}

echo "CPU: $(lscpu | grep 'Model name' | sed 's/Model name: *//'), $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
run serve-2t $PY -m server.cli serve --threads 2
run ray-1x1t $PY -m server.cli serve-ray --replicas 1 --threads 1
run ray-2x1t $PY -m server.cli serve-ray --replicas 2 --threads 1
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
