#!/usr/bin/env bash
# The benchmark run on a lent GPU machine (see README "Benchmarks"). It expects, carried beside the
# repo: .devmodel/ (the default model's config and tokenizer; its weights are too large to carry,
# so the model is built with random weights: timings don't depend on them, as every request
# generates a fixed number of tokens) and .whl/ (transformers 5.24, newer than the image's): both made
# by benchmarks/gpu_prep.sh.
set -euo pipefail
for carried in .devmodel .whl; do
  [ -d "$carried" ] || { echo "gpu_run.sh: $carried/ is missing: make it with benchmarks/gpu_prep.sh and carry it (run(carry=['.devmodel', '.whl']))" >&2; exit 2; }
done
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
failed=0
# First the answers: every request with graphs on == its solo reference (float32), and the device memory
# besides the weights and the pool; then the GPU-only tests (graphs replay the eager static step).
python3 -m benchmarks.gpu_check --model .devmodel --random-weights --device cuda --json "$OUT/gpu_check.json" \
  2>&1 | grep -v Warning | tee "$OUT/gpu_check.txt" || failed=1
if python3 -c "import pytest" 2>/dev/null; then
  python3 -m pytest -q -p no:cacheprovider tests/test_static_decode.py -k recorded_graphs \
    2>&1 | tail -20 | tee "$OUT/gpu_tests.txt" || failed=1
else
  echo "pytest is not installed here: the GPU-only tests did not run" | tee "$OUT/gpu_tests.txt"
fi
M="--model .devmodel --random-weights --device cuda --dtype bfloat16"
# CUDA graphs of the fixed-shape decode step against the eager step (and graphs == static, answer for answer)
python3 -m benchmarks.decode_graphs $M --threads 8 --repeats 3 --json "$OUT/decode_graphs_gpu.json" 2>&1 | grep -v Warning | tee "$OUT/decode_graphs_gpu.txt"
python3 -m benchmarks.decode_graphs $M --threads 8 --repeats 3 --requests 256 --concurrency 128 --json "$OUT/decode_graphs_gpu_256.json" 2>&1 | grep -v Warning | tee "$OUT/decode_graphs_gpu_256.txt"
python3 -m benchmarks.compare $M --threads 8 --repeats 3 --json "$OUT/compare_gpu.json" 2>&1 | grep -v Warning | tee "$OUT/compare_gpu.txt"
python3 -m benchmarks.compare $M --threads 8 --repeats 3 --requests 256 --concurrency 128 --json "$OUT/compare_gpu_256.json" 2>&1 | grep -v Warning | tee "$OUT/compare_gpu_256.txt"
python3 -m benchmarks.prefix_prefill $M --repeats 30 2>&1 | tee "$OUT/prefix_gpu_ttft.txt"
if [ "$failed" != 0 ]; then
  echo "gpu_run.sh: the answer check or the GPU tests FAILED (gpu_check.txt, gpu_tests.txt); timings above are not valid" >&2
  exit 1
fi
