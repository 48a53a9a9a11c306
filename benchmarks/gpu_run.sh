#!/usr/bin/env bash
# The run on a lent GPU machine, one command: `bash benchmarks/gpu_run.sh` (results under $OUT). It
# expects, carried beside the repo: .devmodel/ (the default model's config and tokenizer; its weights are
# too large to carry, so the model is built with random weights: timings don't depend on them, as every
# request generates a fixed number of tokens) and .whl/ (this venv's transformers, newer than the
# image's): both made by benchmarks/gpu_prep.sh, carried with run(carry=['.devmodel', '.whl']).
#
# Order: the answers first (every request with CUDA graphs == its solo reference, and the device memory
# besides the weights and the pool: benchmarks/gpu_check.py), the GPU-only tests, then the timings. It
# stops at the first step that fails, and exits non-zero if the answer check or the tests failed.
#
# REHEARSE=1 runs the same steps on this CPU at toy sizes over a tiny random llama (tests/test_gpu_run.py
# does, in `make test`), so that a step broken between GPU loans is found here, not on the GPU's clock.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "${REHEARSE:-0}" = 1 ]; then
  PY=${PYTHON:-python3}
  MODEL="$OUT/rehearsal-model"
  "$PY" -c "import sys; from pathlib import Path; from server.config import Settings
from server.models import ensure_default_model; from tests.tiny_model import tiny_test_model
tiny_test_model(Path(sys.argv[1]), ensure_default_model(Settings().cache_dir), initializer_range=0.3)" "$MODEL"
  DEVICE=cpu DTYPE=float32 THREADS=2 REPEATS=1 TTFT_REPEATS=2
  TOY="--requests 6 --tasks 2 --concurrency 3 --new-tokens 4 --virtual 4"
  SMALL="$TOY" LARGE="$TOY" CHECK="$TOY"
else
  for carried in .devmodel .whl; do
    [ -d "$carried" ] || {
      echo "gpu_run.sh: $carried/ is missing: make it with benchmarks/gpu_prep.sh and carry it" \
        "(run(carry=['.devmodel', '.whl']))" >&2
      exit 2
    }
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  PY=python3 MODEL=.devmodel DEVICE=cuda DTYPE=bfloat16 THREADS=8 REPEATS=3 TTFT_REPEATS=30
  SMALL="" LARGE="--requests 256 --concurrency 128" CHECK=""
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
failed=0
# shellcheck disable=SC2086  # the size flags are lists of words
"$PY" -m benchmarks.gpu_check --model "$MODEL" --random-weights --device "$DEVICE" $CHECK \
  --json "$OUT/gpu_check.json" 2>&1 | grep -v Warning | tee "$OUT/gpu_check.txt" || failed=1
if [ "$DEVICE" != cuda ]; then
  echo "not on a GPU: the GPU-only tests are skipped" | tee "$OUT/gpu_tests.txt"
elif "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_static_decode.py -k recorded_graphs 2>&1 \
    | tail -20 | tee "$OUT/gpu_tests.txt" || failed=1
else
  echo "pytest is not installed here: the GPU-only tests did not run" | tee "$OUT/gpu_tests.txt"
fi
M="--model $MODEL --random-weights --device $DEVICE --dtype $DTYPE --threads $THREADS"
run() {  # run NAME MODULE FLAGS...: one timing step, its output kept as $OUT/NAME.{txt,json}
  local name=$1 module=$2
  shift 2
  "$PY" -m "benchmarks.$module" "$@" --json "$OUT/$name.json" 2>&1 | grep -v Warning | tee "$OUT/$name.txt"
}
# shellcheck disable=SC2086
{
  # CUDA graphs of the fixed-shape decode step against the eager step (and graphs == static, answer for answer)
  run decode_graphs_gpu decode_graphs $M --repeats $REPEATS $SMALL
  run decode_graphs_gpu_256 decode_graphs $M --repeats $REPEATS $LARGE
  run compare_gpu compare $M --repeats $REPEATS $SMALL
  run compare_gpu_256 compare $M --repeats $REPEATS $LARGE
  "$PY" -m benchmarks.prefix_prefill $M --repeats $TTFT_REPEATS 2>&1 | tee "$OUT/prefix_gpu_ttft.txt"
}
if [ "$failed" != 0 ]; then
  echo "gpu_run.sh: the answer check or the GPU tests FAILED (gpu_check.txt, gpu_tests.txt);" \
    "the timings above are not valid" >&2
  exit 1
fi
echo "gpu_run.sh: done; results in $OUT"
