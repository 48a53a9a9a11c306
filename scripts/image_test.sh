#!/usr/bin/env bash
# Build the image with podman (Docker's engine does not run here), run it, POST /generate, stop it.
# Not part of `make test`. Needs root and the Debian packages podman, runc, debootstrap and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/podman_image.sh  # IMAGE, PODMAN, ULIMITS, require_tools, build_image

PORT=${PORT:-18080}
NAME=softmux-image-test-$$
require_tools podman runc debootstrap curl
trap '"${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true' EXIT
build_image

echo "== run $IMAGE on 127.0.0.1:$PORT"
# No systemd here to time the healthcheck: it is disabled as a timer and run by hand below.
"${PODMAN[@]}" run -d --name "$NAME" --network host -e SOFTMUX_PORT="$PORT" -e SOFTMUX_HOST=127.0.0.1 \
    "${ULIMITS[@]}" --health-interval disable \
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
echo "== native kernels: $("${PODMAN[@]}" logs "$NAME" 2>&1 | grep -o 'native kernels [a-z]*' | head -1)"
"${PODMAN[@]}" logs "$NAME" 2>&1 | grep -q 'native kernels loaded' \
    || { echo "image-test: the server runs without its native kernels" >&2; exit 1; }
"${PODMAN[@]}" healthcheck run "$NAME" 2>/dev/null && echo "== HEALTHCHECK (GET /ready inside the container): healthy" \
    || { echo "image-test: the image's HEALTHCHECK failed" >&2; exit 1; }
echo "== POST /generate (the README's first request: its answer is pinned there)"
out=$(curl -fsS "127.0.0.1:$PORT/generate" -H 'content-type: application/json' -H 'x-request-id: image-test-1' \
    -d '{"task": "iso-date-trained", "inputs": "<|im_start|>user\nthe fourth of July 2021<|im_end|>\n<|im_start|>assistant\n"}')
echo "$out"
echo "$out" | grep -q '"generated_text":"2021-07-04"' || { echo "image-test: not the README's answer (2021-07-04)" >&2; exit 1; }
echo "== stop"
"${PODMAN[@]}" stop -t 10 "$NAME" >/dev/null
echo "image-test: OK"
