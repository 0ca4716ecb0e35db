#!/usr/bin/env bash
# fill_wheels.sh REQUIREMENTS_FILE [WHEEL_DIR]
# Download every wheel REQUIREMENTS_FILE needs (with dependencies) for the images' Python:
# CPython 3.11 on glibc x86_64 (Debian bookworm's python3), binary wheels only.
# WHEEL_DIR defaults to ~/.cache/retrain/wheels (one directory shared by all images; pip skips
# files it already has). A stamp keyed by the requirements' hash makes a repeat call free.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REQS="$1"
WHEELS="${2:-$RETRAIN_CACHE/wheels}"
mkdir -p "$WHEELS/.stamps"
STAMP="$WHEELS/.stamps/$(sha256sum "$REQS" | cut -c1-16)"
if [ -e "$STAMP" ] && [ "${FORCE_WHEELS:-0}" != 1 ]; then
    log "wheels for $REQS already in $WHEELS"; exit 0
fi

if python3 -m pip --version >/dev/null 2>&1; then PIP=(python3 -m pip)
elif command -v uvx >/dev/null; then PIP=(uvx --from pip pip)
else log "need pip (python3 -m pip) or uv to download wheels"; exit 1; fi

PLATFORMS=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux_2_36_x86_64; do
    PLATFORMS+=(--platform "$p")
done
log "downloading wheels for $REQS into $WHEELS"
t0=$SECONDS
"${PIP[@]}" download --disable-pip-version-check --progress-bar off -q \
    --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
    "${PLATFORMS[@]}" -d "$WHEELS" -r "$REQS"
touch "$STAMP"
log "wheels ready in $((SECONDS - t0)) s ($(du -sh "$WHEELS" | cut -f1) in $WHEELS)"
