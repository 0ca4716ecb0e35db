#!/usr/bin/env bash
# Build the trainer images without any registry.
#
#   deploy/docker/build_images.sh [--online] [audio] [keras] [test]     (default: audio keras)
#
#   audio -> retrain/trainer-audio:latest   (trainer_images/audio, PyTorch)
#   keras -> retrain/trainer-keras:latest   (trainer_images/keras, TensorFlow/Keras)
#   test  -> retrain/test-trainer:latest    (tests/docker/image: a tiny contract trainer, no ML)
#
# Offline (default): starts dockerd when it is not running, makes the Debian base
# retrain/debian-python:bookworm (debootstrap + docker import, tarball cached under
# ~/.cache/retrain/docker), fills ~/.cache/retrain/wheels with cp311 manylinux wheels
# (pip download, once per requirements hash) and builds each image on that base with
# pip install --no-index from the wheel directory. The wheels reach the build through a
# loopback HTTP server (docker build --network host): they are never part of a build context or
# of a layer, so a rebuild sends only the trainer's code.
# --online: the Dockerfiles' default CUDA bases and PyPI (for a machine with a registry).
#
# Timings go to ~/.cache/retrain/docker/build-times.log.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ONLINE=0
IMAGES=()
for arg in "$@"; do
    case "$arg" in
        --online) ONLINE=1 ;;
        audio|keras|test) IMAGES+=("$arg") ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) log "unknown argument: $arg"; exit 2 ;;
    esac
done
[ ${#IMAGES[@]} -gt 0 ] || IMAGES=(audio keras)

TIMES="$DOCKER_CACHE/build-times.log"
WHEELS="$RETRAIN_CACHE/wheels"
WHEEL_PORT="${RETRAIN_WHEEL_PORT:-8765}"
# The builds use the classic builder: Debian's docker.io 20.10 has no buildx, and everything here
# works with it (multi-stage is not even needed).
export DOCKER_BUILDKIT=0

# One build at a time per cache (tests of several owners may ask for images at once; they share
# the wheel server's port and the staged contexts).
exec 9>"$DOCKER_CACHE/build.lock"
flock 9

# What outlives this script must not inherit fd 9, or it holds the build lock for its whole life
# (a dockerd started here did: the next build, e.g. `make test` after `make images`, waited
# forever). So dockerd is started with fd 9 closed; make_base.sh runs under our lock without it.
ensure_dockerd 9>&-
if [ "$ONLINE" = 0 ]; then
    bash "$REPO_ROOT/deploy/docker/make_base.sh" 9>&-
fi

SERVER_PID=""
stop_server() { if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; fi; }
trap stop_server EXIT

start_wheel_server() {
    [ -z "$SERVER_PID" ] || return 0
    python3 -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$WHEEL_PORT" >"$DOCKER_CACHE/wheel-server.log" 2>&1 9>&- &
    SERVER_PID=$!
    local i
    for i in $(seq 1 50); do
        if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$WHEEL_PORT/', timeout=1)" 2>/dev/null; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.2
    done
    log "wheel server did not start on 127.0.0.1:$WHEEL_PORT (set RETRAIN_WHEEL_PORT):"; cat "$DOCKER_CACHE/wheel-server.log" >&2; exit 1
}

# stage NAME SRC_DIR: a build context = SRC_DIR (minus .dockerignore'd files, which docker drops) +
# requirements.txt. Staged under the cache so the repo tree is never written to.
stage() {
    local ctx="$DOCKER_CACHE/context/$1"
    rm -rf "$ctx"; mkdir -p "$ctx"
    cp -a "$2"/. "$ctx"/
    find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
    echo "$ctx"
}

build() {  # build NAME TAG CONTEXT
    local name=$1 tag=$2 ctx=$3 t0=$SECONDS
    local args=(--network host -t "$tag" -f "$ctx/Dockerfile")
    if [ "$ONLINE" = 0 ]; then
        args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
        if [ -s "$ctx/requirements.txt" ]; then
            bash "$REPO_ROOT/deploy/docker/fill_wheels.sh" "$ctx/requirements.txt" "$WHEELS"
            start_wheel_server
            args+=(--build-arg "PIP_ARGS=--no-index --find-links http://127.0.0.1:$WHEEL_PORT/")
        fi
    fi
    log "building $tag"
    docker build -q "${args[@]}" "$ctx" >/dev/null 2>"$DOCKER_CACHE/build-$name.err" \
        || { cat "$DOCKER_CACHE/build-$name.err" >&2; docker build "${args[@]}" "$ctx" >&2 || true; log "build of $tag failed"; exit 1; }
    local took=$((SECONDS - t0))
    local size; size=$(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1/1e9}')
    log "$tag built in $took s ($size)"
    printf '%s\t%s\t%s s\t%s\n' "$(date -Is)" "$tag" "$took" "$size" >>"$TIMES"
}

for image in "${IMAGES[@]}"; do
    case "$image" in
    audio)
        ctx=$(stage audio "$REPO_ROOT/trainer_images/audio")
        # The trainer's pinned requirements, exported from the one lock file.
        extras=(--extra trainer)
        # The trainer checks its ONNX export with onnxruntime; until the lock's `trainer` extra
        # carries it, take it (fully pinned) from the `dev` extra, which also adds pytest & co.
        trainer_reqs=$(cd "$REPO_ROOT" && uv export --frozen --extra trainer --no-emit-project --no-hashes -q)
        if ! grep -q '^onnxruntime==' <<<"$trainer_reqs"; then
            log "the trainer extra lacks onnxruntime: adding the dev extra to the audio image"
            extras+=(--extra dev)
        fi
        (cd "$REPO_ROOT" && uv export --frozen "${extras[@]}" --no-emit-project --no-hashes -q) >"$ctx/requirements.txt"
        # torch and its dependencies (CUDA wheels, triton): the Dockerfile's first, heavy pip layer.
        grep -E '^(torch|triton|nvidia-[a-z0-9-]+|sympy|mpmath|networkx|jinja2|markupsafe|filelock|fsspec|typing-extensions|setuptools)==' \
            "$ctx/requirements.txt" >"$ctx/requirements-torch.txt"
        build audio retrain/trainer-audio:latest "$ctx" ;;
    keras)
        ctx=$(stage keras "$REPO_ROOT/trainer_images/keras")
        if [ "$ONLINE" = 0 ]; then
            # No GPU here and no CUDA libraries in the base: the CPU build of the same TensorFlow.
            sed -i -E 's/^tensorflow(\[[^]]*\])?==/tensorflow-cpu==/' "$ctx/requirements.txt"
        fi
        build keras retrain/trainer-keras:latest "$ctx" ;;
    test)
        ctx=$(stage test "$REPO_ROOT/tests/docker/image")
        build test retrain/test-trainer:latest "$ctx" ;;
    esac
done
