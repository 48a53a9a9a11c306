#!/usr/bin/env bash
# Prepares what benchmarks/gpu_run.sh expects beside the repo on a lent GPU machine (both git-ignored;
# pass them in the device run's `carry`):
#   .devmodel/  the default model's config and tokenizer, no weights (gpu_run.sh builds the model with
#               random weights: the converted weights are too large to carry, and timings do not depend on
#               weight values when every request generates a fixed number of tokens)
#   .whl/       this venv's transformers wheel (the GPU image's own is older)
# Then, on the device: `bash benchmarks/gpu_run.sh` (results under $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
model="${SOFTMUX_CACHE_DIR:-$HOME/.cache/softmux}/SmolLM2-135M-Instruct"
[ -f "$model/config.json" ] || { echo "no converted default model at $model: run 'make model' first" >&2; exit 1; }
rm -rf .devmodel .whl
mkdir -p .devmodel .whl
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$model/$f" ] && cp "$model/$f" .devmodel/
done
version=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .whl "transformers==$version"
ls .devmodel .whl
