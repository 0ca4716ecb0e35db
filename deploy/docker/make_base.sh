#!/usr/bin/env bash
# Build the local base image retrain/debian-python:bookworm without any registry:
# debootstrap a Debian bookworm minbase root file system with Python 3.11 (the CPython our
# cp311 wheels are built for), ffmpeg and libsndfile, tar it and `docker import` it.
# The tarball is cached under ~/.cache/retrain/docker/, keyed by the package list, so the slow
# debootstrap runs once per machine; the image is re-imported from it when Docker lost it.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SUITE=bookworm
PACKAGES="python3,python3-venv,ffmpeg,libsndfile1,tini,ca-certificates"
KEY=$(printf '%s|%s|v1' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-12)
TARBALL="$DOCKER_CACHE/debian-python-$SUITE-$KEY.tar"

ensure_dockerd

if image_exists "$BASE_IMAGE" && [ "$(image_label "$BASE_IMAGE" retrain.base.key)" = "$KEY" ] && [ "${FORCE_BASE:-0}" != 1 ]; then
    log "$BASE_IMAGE is up to date ($KEY)"; exit 0
fi

if [ ! -s "$TARBALL" ] || [ "${FORCE_BASE:-0}" = 1 ]; then
    command -v debootstrap >/dev/null || { log "debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
    MIRROR="${DEBIAN_MIRROR:-$(debian_mirror)}"
    ROOTFS=$(mktemp -d "$DOCKER_CACHE/rootfs.XXXXXX")
    mkdir -p "$DOCKER_CACHE/debootstrap-debs"
    trap 'rm -rf "$ROOTFS"' EXIT
    log "debootstrap $SUITE from $MIRROR into $ROOTFS (packages: $PACKAGES)"
    t0=$SECONDS
    debootstrap --variant=minbase --include="$PACKAGES" \
        --cache-dir="$DOCKER_CACHE/debootstrap-debs" "$SUITE" "$ROOTFS" "$MIRROR" >"$DOCKER_CACHE/debootstrap.log" 2>&1 \
        || { tail -30 "$DOCKER_CACHE/debootstrap.log" >&2; exit 1; }
    log "debootstrap done in $((SECONDS - t0)) s"
    # Slim down: apt lists and caches, docs, man pages, locales other than C.
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
           "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
           "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/*
    find "$ROOTFS"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'C*' -exec rm -rf {} + 2>/dev/null || true
    # Same apt sources as the host so an image author can still apt-get install where a mirror is reachable.
    echo "deb $MIRROR $SUITE main" >"$ROOTFS/etc/apt/sources.list"
    tar --numeric-owner -C "$ROOTFS" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$ROOTFS"; trap - EXIT
    # Older tarballs of other package lists are dead weight.
    find "$DOCKER_CACHE" -maxdepth 1 -name "debian-python-$SUITE-*.tar" ! -name "$(basename "$TARBALL")" -delete
fi

log "docker import $TARBALL as $BASE_IMAGE"
docker import \
    --change 'ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1' \
    --change "LABEL retrain.base.key=$KEY" \
    --change 'CMD ["/bin/bash"]' \
    "$TARBALL" "$BASE_IMAGE" >/dev/null
log "$BASE_IMAGE: $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
