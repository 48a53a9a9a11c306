# Sourced by image_test.sh and compose_test.sh: build softmux's image with podman where Docker's engine
# does not run. Needs root and the Debian packages podman, runc and debootstrap.
#
# No image registry is reachable, so the base is a Debian bookworm made with debootstrap and imported
# once (kept in WORK); the Dockerfile installs Python 3.11 into it from Debian. pip inside the build
# uses this machine's CA bundle (a build secret) and the host network; a local torch CPU wheel, when
# there is one, is staged into docker/wheels/ and preferred over any index.

IMAGE=${IMAGE:-softmux:test}
BASE=${BASE:-localhost/softmux-bookworm:latest}
WORK=${WORK:-/var/tmp/softmux-image}
CA=${CA:-/etc/ssl/certs/ca-certificates.crt}
PODMAN=(podman --runtime runc)
# runc here cannot apply podman's default rlimits (EPERM on RLIMIT_NOFILE/NPROC): every run sets them.
ULIMITS=(--ulimit nofile=8192:8192 --ulimit nproc=8192:8192)

require_tools() {
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install -y podman runc debootstrap curl)" >&2; exit 1; }
    done
}

ensure_base() {
    "${PODMAN[@]}" image exists "$BASE" && return
    if [ ! -x "$WORK/rootfs/bin/sh" ]; then
        echo "== debootstrap bookworm into $WORK/rootfs"
        mkdir -p "$WORK"
        debootstrap --variant=minbase bookworm "$WORK/rootfs"
    fi
    echo "== import $BASE"
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE"
}

build_image() {
    ensure_base
    local staged=() wheel status=0
    for wheel in /opt/wheels/torch-2.13.0*cpu*.whl; do
        [ -e "$wheel" ] || continue
        cp -n "$wheel" docker/wheels/ && staged+=("docker/wheels/$(basename "$wheel")")
    done
    echo "== build $IMAGE from $BASE"
    "${PODMAN[@]}" build --format docker --network host --secret "id=ca,src=$CA" \
        --build-arg "BASE_IMAGE=$BASE" --build-arg "TORCH_INDEX_URL=" \
        -t "$IMAGE" -f Dockerfile . || status=$?
    for wheel in "${staged[@]}"; do rm -f "$wheel"; done
    return "$status"
}
