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
M="--model .devmodel --random-weights --device cuda --dtype bfloat16"
# CUDA graphs of the fixed-shape decode step against the eager step (and graphs == static, answer for answer)
python3 -m benchmarks.decode_graphs $M --threads 8 --repeats 3 --json "$OUT/decode_graphs_gpu.json" 2>&1 | grep -v Warning | tee "$OUT/decode_graphs_gpu.txt"
python3 -m benchmarks.decode_graphs $M --threads 8 --repeats 3 --requests 256 --concurrency 128 --json "$OUT/decode_graphs_gpu_256.json" 2>&1 | grep -v Warning | tee "$OUT/decode_graphs_gpu_256.txt"
python3 -m benchmarks.compare $M --threads 8 --repeats 3 --json "$OUT/compare_gpu.json" 2>&1 | grep -v Warning | tee "$OUT/compare_gpu.txt"
python3 -m benchmarks.compare $M --threads 8 --repeats 3 --requests 256 --concurrency 128 --json "$OUT/compare_gpu_256.json" 2>&1 | grep -v Warning | tee "$OUT/compare_gpu_256.txt"
python3 -m benchmarks.prefix_prefill $M --repeats 30 2>&1 | tee "$OUT/prefix_gpu_ttft.txt"
