#!/usr/bin/env bash
# Time from `git clone` to the first answer, as a new user meets it: a fresh clone, an empty HOME (no
# pip cache, no converted model, no built kernels), `make serve`, then the README's first request.
# Prints the seconds of each phase. Usage: scripts/time_to_first_answer.sh [repository] [port]
set -euo pipefail
repo=${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
port=${2:-8765}
work=$(mktemp -d)
export HOME=$work/home XDG_CACHE_HOME=$work/home/.cache PIP_CACHE_DIR=$work/home/.cache/pip
mkdir -p "$HOME"
trap 'kill -- -$server 2>/dev/null || true; rm -rf "$work"' EXIT

began=$(date +%s.%N)
git clone -q "$repo" "$work/softmux"
cd "$work/softmux"
# each output line stamped with the seconds since the clone began, to time the setup's phases
setsid bash -c 'make serve ARGS="--port $1" 2>&1 | while IFS= read -r line; do
  printf "%6.1f %s\n" "$(echo "$(date +%s.%N) - $2" | bc)" "$line"; done' _ "$port" "$began" > "$work/serve.log" &
server=$!
until curl -sf "localhost:$port/ready" > /dev/null; do
  if ! kill -0 "$server" 2> /dev/null; then tail -20 "$work/serve.log"; exit 1; fi
  sleep 1
done
ready=$(date +%s.%N)
answer=$(curl -s "localhost:$port/generate" -H 'content-type: application/json' -d '{"task": "iso-date-trained",
  "inputs": "<|im_start|>user\nthe fourth of July 2021<|im_end|>\n<|im_start|>assistant\n"}')
done_at=$(date +%s.%N)
grep -E "^ *[0-9.]+ (==>|.*ready in)" "$work/serve.log" | sed 's/^/  /'
echo "answer: $answer"
echo "clone to ready: $(echo "$ready - $began" | bc) s; clone to first answer: $(echo "$done_at - $began" | bc) s"
