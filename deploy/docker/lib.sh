# Shared helpers for the offline image builds. Source it; do not run it.
set -euo pipefail

RETRAIN_CACHE="${RETRAIN_CACHE:-$HOME/.cache/retrain}"
DOCKER_CACHE="$RETRAIN_CACHE/docker"
BASE_IMAGE="${BASE_IMAGE:-retrain/debian-python:bookworm}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mkdir -p "$DOCKER_CACHE"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# Start dockerd (as root, in the background) when the socket does not answer, and wait for it.
ensure_dockerd() {
    if docker info >/dev/null 2>&1; then return 0; fi
    if ! command -v dockerd >/dev/null; then
        log "dockerd is not installed (apt-get install docker.io)"; return 1
    fi
    if [ "$(id -u)" != 0 ]; then
        log "Docker Engine is not reachable and only root can start dockerd"; return 1
    fi
    local logfile="${DOCKERD_LOG:-$RETRAIN_CACHE/dockerd.log}"
    log "starting dockerd (log: $logfile)"
    # setsid: the daemon must outlive this script and the CI step that ran it.
    setsid nohup dockerd >"$logfile" 2>&1 </dev/null &
    local i
    for i in $(seq 1 120); do
        if docker info >/dev/null 2>&1; then log "dockerd is up"; return 0; fi
        sleep 0.5
    done
    log "dockerd did not come up in 60 s; last lines of $logfile:"; tail -20 "$logfile" >&2
    return 1
}

# The Debian mirror apt is configured with on this host (deb822 or one-line sources), else deb.debian.org.
debian_mirror() {
    local m
    m=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -E 'debian/?$|debian[[:space:]]' | grep -v security | head -1 \
        | sed -E 's/^URIs:[[:space:]]*//; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//; s/[[:space:]].*$//') || true
    echo "${m:-http://deb.debian.org/debian}"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_label() { docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }
