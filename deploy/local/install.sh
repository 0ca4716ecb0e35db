#!/usr/bin/env bash
# Installs everything the local stack and the tests need, on a fresh Debian machine
# (Python 3.11, Go, JDK 17 + Maven present) or on one where it is all cached already.
#
# Idempotent: every step checks first and does nothing when its result is there, so a
# second run takes a few seconds. Downloads and builds are cached under ~/.cache
# (uv wheels in ~/.cache/uv, Kafka jars and the MinIO binary in ~/.cache/retrain), but
# nothing here assumes the cache exists.
#
# Options (environment):
#   RETRAIN_SKIP_APT=1           do not check/install Debian packages
#   RETRAIN_SKIP_SERVICE_ENV=1   do not sync .venv (api + worker + dev)
#   RETRAIN_SKIP_TRAINER_ENV=1   do not install .venv-trainer (PyTorch: large)
#   RETRAIN_SKIP_KAFKA=1         do not fetch the Kafka jars
#   RETRAIN_SKIP_MINIO=1         do not build MinIO
#   RETRAIN_CACHE=DIR            where Kafka and MinIO go (default ~/.cache/retrain)
set -euo pipefail

# Versions are pinned here and in deploy/local/stack.py (which reads the same paths).
KAFKA_VERSION=3.9.1
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c
# postgresql-15: the server the stack and the tests run (not as a system service); nginx: the
# reverse proxy in front of several API replicas (tests/e2e/test_replicas.py); wrk: the HTTP load
# generator of bench/read_speed.py.
APT_PACKAGES=(espeak-ng flite sox libsox-fmt-all ffmpeg libsndfile1 docker.io debootstrap chromium postgresql-15 nginx wrk)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${RETRAIN_CACHE:-$HOME/.cache/retrain}"
KAFKA_HOME="$CACHE/kafka-$KAFKA_VERSION"
BIN="$CACHE/bin"

log() { printf '[install] %s\n' "$*"; }
t0=$(date +%s)

mkdir -p "$CACHE" "$BIN"
# Two installs at once (say `make demo` and `make test` in two shells) would run two
# Maven or Go builds into the same place; serialise them on a lock in the cache.
exec 9>"$CACHE/install.lock"
if ! flock -n 9; then
    log "another install is running; waiting for it"
    flock 9
fi

# --- Debian packages ------------------------------------------------------------------
if [[ "${RETRAIN_SKIP_APT:-0}" != 1 ]]; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]})); then
        log "apt: installing ${missing[*]}"
        SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
        # Only refresh the package lists when something is actually missing: it is slow.
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        # Packages with a daemon (nginx, postgresql) must not start one as a system service: the
        # stack starts its own on free ports. policy-rc.d answering 101 tells invoke-rc.d "no".
        made_policy=0
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
            $SUDO chmod +x /usr/sbin/policy-rc.d
            made_policy=1
        fi
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
        if ((made_policy)); then $SUDO rm -f /usr/sbin/policy-rc.d; fi
    else
        log "apt: all present (${APT_PACKAGES[*]})"
    fi
fi

# --- uv -------------------------------------------------------------------------------
if ! command -v uv >/dev/null 2>&1; then
    log "uv: pip install uv"
    # Debian's own python3 refuses pip installs outside a venv (PEP 668); uv is a single
    # static binary that touches nothing else, so overriding that is harmless here.
    python3 -m pip install -q uv 2>/dev/null || python3 -m pip install -q --break-system-packages uv
    # pip may put it in ~/.local/bin, which is not always on PATH.
    export PATH="$HOME/.local/bin:$PATH"
    hash -r
fi
log "uv: $(uv --version)"

cd "$ROOT"

# --- service env: .venv (api + worker + client + dev, no PyTorch) -------------------------------
if [[ "${RETRAIN_SKIP_SERVICE_ENV:-0}" != 1 ]]; then
    log "service env: uv sync --frozen --extra api --extra worker --extra client --extra dev -> .venv"
    uv sync -q --frozen --extra api --extra worker --extra client --extra dev
fi

# --- trainer env: .venv-trainer (PyTorch and friends) ----------------------------------
# Not a uv project env: it holds the trainer extra's pinned packages only, from the lock.
if [[ "${RETRAIN_SKIP_TRAINER_ENV:-0}" != 1 ]]; then
    if [[ ! -x .venv-trainer/bin/python ]]; then
        log "trainer env: uv venv .venv-trainer"
        uv venv -q .venv-trainer
    fi
    req="$(mktemp)"
    trap 'rm -f "$req"' EXIT
    uv export -q --frozen --extra trainer --extra dev --no-emit-project --no-hashes -o "$req"
    log "trainer env: uv pip install (trainer + dev extras, from uv.lock) -> .venv-trainer"
    uv pip install -q --python .venv-trainer/bin/python -r "$req"
fi

# --- Kafka jars from Maven Central -------------------------------------------------------
# The stamp holds a hash of the pom: the jars are complete only when Maven finished for
# exactly this pom (an interrupted copy leaves libs/ without a stamp and gets redone).
if [[ "${RETRAIN_SKIP_KAFKA:-0}" != 1 ]]; then
    pom="$HERE/kafka-pom.xml"
    want="$(sha256sum "$pom" | cut -d' ' -f1)"
    stamp="$KAFKA_HOME/.complete"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        log "kafka: $KAFKA_VERSION jars present ($(ls "$KAFKA_HOME/libs" | wc -l) in $KAFKA_HOME/libs)"
    else
        log "kafka: fetching $KAFKA_VERSION jars with Maven -> $KAFKA_HOME/libs"
        rm -rf "$KAFKA_HOME/libs"
        mkdir -p "$KAFKA_HOME/libs"
        mvn -q -B -Dstyle.color=never -f "$pom" dependency:copy-dependencies \
            -DoutputDirectory="$KAFKA_HOME/libs" -DincludeScope=runtime 2>&1 | sed "s/\x1b\[[0-9;]*m//g"
        echo "$want" >"$stamp"
        log "kafka: $(ls "$KAFKA_HOME/libs" | wc -l) jars"
    fi
fi

# --- MinIO built from source ----------------------------------------------------------------
if [[ "${RETRAIN_SKIP_MINIO:-0}" != 1 ]]; then
    stamp="$BIN/minio.version"
    if [[ -x "$BIN/minio" && ( ! -f "$stamp" || "$(cat "$stamp")" == "$MINIO_VERSION" ) ]]; then
        # A binary without a stamp was built by hand with the same command: accept it.
        [[ -f "$stamp" ]] || echo "$MINIO_VERSION" >"$stamp"
        log "minio: present ($BIN/minio, $MINIO_VERSION)"
    else
        log "minio: go install github.com/minio/minio@$MINIO_VERSION (several minutes the first time)"
        # go install writes the binary only once linking succeeded, so an interrupted build
        # leaves no half-written binary behind.
        GOBIN="$BIN" go install "github.com/minio/minio@$MINIO_VERSION"
        echo "$MINIO_VERSION" >"$stamp"
        log "minio: built $BIN/minio"
    fi
fi

log "done in $(( $(date +%s) - t0 )) s"
