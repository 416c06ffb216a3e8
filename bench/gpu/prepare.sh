#!/usr/bin/env bash
# On the BUILD machine (network to PyPI, the CUDA toolchain of scripts/install-cuda-toolchain.sh):
# puts into bench/gpu/ everything run.sh needs on a GPU machine that has no network and no Rust:
#   bench/gpu/bin/kino.xz        the kino binary built with --features cuda,flash-attn, stripped and
#                                xz-compressed (101 MB -> 17 MB: the carry limit is 64 MiB in all)
#   bench/gpu/bin/kino-cudnn.xz  the same with --features cudnn,flash-attn (cuDNN convolutions); run.sh runs
#                                it as a second Kino column (skip: KINO_CUDNN=0)
#   bench/gpu/wheels/      diffusers (pinned as fixtures/requirements.txt) + importlib_metadata
# Both folders are git-ignored: carry them to the GPU machine with the working tree.
#
#   bench/gpu/prepare.sh [VENV]        # VENV: the CUDA toolchain venv (default $HOME/.kino-cuda-venv)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source scripts/cuda-env.sh "${1:-${KINO_CUDA_VENV:-$HOME/.kino-cuda-venv}}"
mkdir -p "$HERE/bin" "$HERE/wheels"
pack() {  # pack FEATURES NAME
    nice -n 19 cargo build --release -p kino --features "$1"
    cp target/release/kino "$HERE/bin/$2"
    # FFmpeg stubs for a machine without FFmpeg 5's libraries (the GPU image; see libav-stubs.sh)
    "$HERE/libav-stubs.sh" "$HERE/bin/$2" "$HERE/bin/avstub"
    strip "$HERE/bin/$2" || true
    xz -T0 -9e -f "$HERE/bin/$2"       # -> bin/NAME.xz (101 MB -> 17 MB); run.sh unpacks it
}
# Flash attention (vendor/candle-flash-attn) when CUTLASS's headers are there (cuda-env.sh sets
# CUTLASS_DIR; install-cuda-toolchain.sh fetches them).
FA=""
if [ -d "${CUTLASS_DIR:-}/include/cute" ]; then FA=",flash-attn"; else
    echo "prepare.sh: no CUTLASS in '${CUTLASS_DIR:-}': building WITHOUT flash attention" >&2; fi
export CANDLE_FLASH_ATTN_BUILD_DIR="${CANDLE_FLASH_ATTN_BUILD_DIR:-$ROOT/target/flash-attn}"
mkdir -p "$CANDLE_FLASH_ATTN_BUILD_DIR"
pack "cuda$FA" kino
if [ "${KINO_CUDNN:-1}" != 0 ]; then pack "cudnn$FA" kino-cudnn; fi
PY="${PYTHON:-python3}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$HERE/wheels" \
    "diffusers==0.42.1" "importlib_metadata"
ls -la "$HERE/bin" "$HERE/wheels"
du -sh "$HERE/bin" "$HERE/wheels"
