#!/usr/bin/env bash
# Build the image with podman (Docker's engine does not run here), run it, POST /generate, stop it.
# Not part of `make test`. Needs root and the Debian packages podman, runc and debootstrap.
#
# No image registry is reachable, so the base is a Debian bookworm made with debootstrap and
# imported once (kept in WORK); the Dockerfile installs Python 3.11 into it from Debian. pip
# inside the build uses this machine's CA bundle (a build secret) and the host network; a local
# torch CPU wheel, when there is one, is staged into docker/wheels/ and preferred over any index.
set -euo pipefail

IMAGE=${IMAGE:-softmux:test}
BASE=${BASE:-localhost/softmux-bookworm:latest}
WORK=${WORK:-/var/tmp/softmux-image}
PORT=${PORT:-18080}
NAME=softmux-image-test-$$
CA=${CA:-/etc/ssl/certs/ca-certificates.crt}
PODMAN=(podman --runtime runc)
cd "$(dirname "$0")/.."

for tool in podman runc debootstrap curl; do
    command -v "$tool" >/dev/null || { echo "image-test: $tool is missing (apt-get install -y podman runc debootstrap curl)" >&2; exit 1; }
done

if ! "${PODMAN[@]}" image exists "$BASE"; then
    if [ ! -x "$WORK/rootfs/bin/sh" ]; then
        echo "== debootstrap bookworm into $WORK/rootfs"
        mkdir -p "$WORK"
        debootstrap --variant=minbase bookworm "$WORK/rootfs"
    fi
    echo "== import $BASE"
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE"
fi

staged=()
for wheel in /opt/wheels/torch-2.13.0*cpu*.whl; do
    [ -e "$wheel" ] || continue
    cp -n "$wheel" docker/wheels/ && staged+=("docker/wheels/$(basename "$wheel")")
done
cleanup() {
    "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
    for f in "${staged[@]}"; do rm -f "$f"; done
}
trap cleanup EXIT

echo "== build $IMAGE from $BASE"
"${PODMAN[@]}" build --format docker --network host --secret "id=ca,src=$CA" \
    --build-arg "BASE_IMAGE=$BASE" --build-arg "TORCH_INDEX_URL=" \
    -t "$IMAGE" -f Dockerfile .

echo "== run $IMAGE on 127.0.0.1:$PORT"
# Explicit ulimits: runc here cannot apply podman's defaults (EPERM on RLIMIT_NOFILE/NPROC).
# No systemd here to time the healthcheck: it is disabled as a timer and run by hand below.
"${PODMAN[@]}" run -d --name "$NAME" --network host -e SOFTMUX_PORT="$PORT" -e SOFTMUX_HOST=127.0.0.1 \
    --ulimit nofile=8192:8192 --ulimit nproc=8192:8192 --health-interval disable \
    -v "$PWD/prompts_store:/app/prompts_store:ro" "$IMAGE" >/dev/null
for _ in $(seq 1 120); do
    if curl -fsS "127.0.0.1:$PORT/ready" >/dev/null 2>&1; then break; fi
    if [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$NAME")" != true ]; then
        "${PODMAN[@]}" logs "$NAME" | tail -30; echo "image-test: the container exited" >&2; exit 1
    fi
    sleep 1
done
curl -fsS "127.0.0.1:$PORT/ready"; echo
echo "== user in the container: $("${PODMAN[@]}" exec "$NAME" id -un)"
"${PODMAN[@]}" healthcheck run "$NAME" 2>/dev/null && echo "== HEALTHCHECK (GET /ready inside the container): healthy" \
    || { echo "image-test: the image's HEALTHCHECK failed" >&2; exit 1; }
echo "== POST /generate"
out=$(curl -fsS "127.0.0.1:$PORT/generate" -H 'content-type: application/json' -H 'x-request-id: image-test-1' \
    -d '{"task": "sentiment", "inputs": "<|im_start|>user\nThe battery died after a day.<|im_end|>\n<|im_start|>assistant\n", "parameters": {"max_new_tokens": 16}}')
echo "$out"
echo "$out" | grep -q '"generated_text"' || { echo "image-test: no generated_text" >&2; exit 1; }
echo "== stop"
"${PODMAN[@]}" stop -t 10 "$NAME" >/dev/null
echo "image-test: OK"
