#!/usr/bin/env bash
# `docker compose up` checked with podman-compose (Docker's engine does not run here): docker-compose.yml's
# softmux and Prometheus services as written, `softmux bench` load over every task, then Prometheus must scrape
# softmux by its service name and every expression of the Grafana dashboard must answer
# (scripts/dashboard_queries.py). Not part of `make test`: needs root, the Debian packages podman, runc,
# debootstrap and curl, and PyPI for podman-compose (installed into WORK).
#
# Where this differs from `docker compose up`, and why:
# - No image registry is reachable. softmux's image is built as `make image-test` builds it; the
#   prom/prometheus image is a stand-in made from Debian's prometheus package (2.42) with the official
#   image's entrypoint, arguments, user and storage folder. Grafana's image is in no reachable registry
#   and Grafana in no package index, so its service is left out (tests/test_dashboard.py checks its
#   provisioning; this script checks the dashboard's queries).
# - podman 4.3 cannot wait for `condition: service_healthy` (podman-compose skips it with a warning) and
#   no systemd times healthchecks here: the script runs softmux's compose healthcheck until it passes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/podman_image.sh  # IMAGE, BASE, WORK, PODMAN, ULIMITS, require_tools, build_image

PROJECT=softmux-compose-test
PYTHON=${PYTHON:-.venv/bin/python}
CONCURRENCY=${CONCURRENCY:-4 16 48}  # the load's levels, one after another (compose sets 32 rows a pass)
PREVIEW=${PREVIEW:-}  # a PNG path: draw the dashboard's panels over the load (scripts/dashboard_preview.py)
# requests per level: enough for the check, or a few minutes of load for a preview worth looking at
REQUESTS=${REQUESTS:-$([ -n "$PREVIEW" ] && echo 1500 || echo 240)}
PROMETHEUS_IMAGE=docker.io/prom/prometheus:latest
require_tools podman runc debootstrap curl
[ -x "$PYTHON" ] || { echo "compose-test: $PYTHON is missing (make venv)" >&2; exit 1; }

if [ ! -x "$WORK/compose-venv/bin/podman-compose" ]; then
    echo "== podman-compose into $WORK/compose-venv"
    python3 -m venv "$WORK/compose-venv"
    "$WORK/compose-venv/bin/pip" install -q 'podman-compose>=1.2,<2'
fi
COMPOSE=("$WORK/compose-venv/bin/podman-compose" --podman-args "--runtime runc"
    --podman-run-args "${ULIMITS[*]}" --in-pod false -p "$PROJECT" -f docker-compose.yml)

build_image
"${PODMAN[@]}" tag "$IMAGE" localhost/softmux:latest  # compose's `image: softmux:latest`
if ! "${PODMAN[@]}" image exists "$PROMETHEUS_IMAGE"; then
    echo "== stand-in $PROMETHEUS_IMAGE from Debian's prometheus package"
    "${PODMAN[@]}" build --format docker --network host -t "$PROMETHEUS_IMAGE" -f - . <<EOF
FROM $BASE
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus /var/lib/prometheus/metrics2 \
    && chown -R nobody:nogroup /prometheus /var/lib/prometheus
USER nobody
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
fi

down() {
    "${COMPOSE[@]}" down -t 10 >/dev/null 2>&1 || true
}
trap down EXIT

container() {  # the container of a compose service
    "${PODMAN[@]}" ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1"
}
echo "== podman-compose up softmux prometheus"
"${COMPOSE[@]}" up -d --no-build --pull never softmux prometheus
softmux=$(container softmux)
for i in $(seq 1 60); do
    if "${PODMAN[@]}" healthcheck run "$softmux" >/dev/null 2>&1; then
        echo "== softmux healthy (compose healthcheck, GET /ready inside the container) after ~$((i * 5)) s"
        break
    fi
    [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$softmux")" = true ] \
        || { "${PODMAN[@]}" logs "$softmux" | tail -30; echo "compose-test: softmux exited" >&2; exit 1; }
    [ "$i" = 60 ] && { echo "compose-test: softmux not healthy after 300 s" >&2; exit 1; }
    sleep 5
done

prometheus=$(container prometheus)
for i in $(seq 1 30); do
    curl -fsS 127.0.0.1:9090/-/ready >/dev/null 2>&1 && break
    if [ "$i" = 30 ] || [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$prometheus")" != true ]; then
        "${PODMAN[@]}" logs "$prometheus" 2>&1 | tail -20; echo "compose-test: Prometheus is not up" >&2; exit 1
    fi
    sleep 2
done
echo "== Prometheus ready on the published port 9090"

echo "== load: softmux bench through the published port 8000, every task, ${CONCURRENCY} clients in turn"
load_start=$SECONDS
# shellcheck disable=SC2086  # CONCURRENCY is a list of levels
"$PYTHON" -m server.cli bench --url http://127.0.0.1:8000 --tasks 0 --concurrency $CONCURRENCY \
    --requests "$REQUESTS" --max-new-tokens 32 --no-progress \
    || { echo "compose-test: requests failed under load (errors column above)" >&2; exit 1; }

echo "== Prometheus's scrape target (softmux:8000, by compose service name)"
targets=$(curl -fsS 127.0.0.1:9090/api/v1/targets)
echo "$targets" | "$PYTHON" -c 'import json, sys
for t in json.load(sys.stdin)["data"]["activeTargets"]:
    print(" ", t["scrapeUrl"], t["health"], t["lastError"] or "")'
echo "$targets" | grep -q '"health":"up"' || { echo "compose-test: Prometheus cannot scrape softmux" >&2; exit 1; }

echo "== the dashboard's expressions against compose's Prometheus"
"$PYTHON" scripts/dashboard_queries.py --prometheus http://127.0.0.1:9090
if [ -n "$PREVIEW" ]; then
    echo "== the dashboard's panels over the load, drawn into $PREVIEW"
    "$PYTHON" scripts/dashboard_preview.py --prometheus http://127.0.0.1:9090 --out "$PREVIEW" \
        --minutes "$(( (SECONDS - load_start) / 60 + 2 ))" \
        --caption "softmux dashboard panels under softmux bench (concurrency ${CONCURRENCY// /, }), drawn from compose's Prometheus; $(date -u +%F)"
fi
echo "compose-test: OK (softmux and Prometheus; Grafana left out, see the head of this script)"
