#!/usr/bin/env bash
# THE one command on the GPU machine (CUDA driver, python3 with PyTorch; no network, no Rust):
#
#   bench/gpu/run.sh [KINO_BINARY]        # default: bench/gpu/bin/kino.xz unpacked (see prepare.sh)
#
# Makes random full-size Wan2.1-T2V-1.3B weights, runs diffusers (bf16, SDPA) and Kino (bf16) for
# $STEPS steps (default 5) at 832×480×81 with guidance 5 plus the VAE decode, prints the table.
# Results (results.md, results.json, logs, timings) go to $OUT if set, else bench/gpu/out/.
# Budget: at most ~9 minutes on an H100, expected less (weights ~1 min, diffusers ~1 min, Kino
# and Kino+cuDNN: the unknowns; each side is killed after $SIDE_TIMEOUT s, default 140, and the
# table still comes out). Give the run call timeout_s 600.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUTDIR="${OUT:-$HERE/out}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
unpack() {  # bin/NAME.xz -> bin/NAME (python's lzma: no xz tool needed)
    local f="$HERE/bin/$1"
    if [ ! -x "$f" ] && [ -f "$f.xz" ]; then
        "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            "$f.xz" "$f" && chmod +x "$f"
    fi
}
KINO="${1:-}"
if [ -z "$KINO" ]; then unpack kino; KINO="$HERE/bin/kino"; fi
ALT=()
if [ "${KINO_CUDNN:-1}" != 0 ]; then
    unpack kino-cudnn
    [ -x "$HERE/bin/kino-cudnn" ] && ALT=(--kino-alt "$HERE/bin/kino-cudnn" --kino-alt-name kino-cudnn)
fi
exec > >(tee -a "$OUTDIR/run.log") 2>&1

echo "== machine"; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

# diffusers is not in the image: install the carried wheels (no network needed).
if ! "$PY" -c 'import diffusers' 2>/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps "$HERE"/wheels/*.whl || {
        echo "diffusers missing and bench/gpu/wheels/ has no wheels: run bench/gpu/prepare.sh on the build machine"; exit 2; }
fi
"$PY" -c 'import diffusers; print("diffusers", diffusers.__version__)'

# Kino links to the CUDA libraries of NVIDIA's wheels (cuBLAS, cuRAND, NVRTC, cuDNN): use the ones
# PyTorch's own wheels put into site-packages. libcuda.so.1 comes from the driver.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for d in "$SITE"/nvidia/*/lib "$SITE"/nvidia/cu13/lib; do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH
for k in "$KINO" "${ALT[1]:-}"; do
    [ -n "$k" ] || continue
    echo "== $k"; ls -la "$k"; ldd "$k" | grep -E "not found|cuda|cublas|curand|nvrtc|cudnn" || true
    "$k" --version || true
done

"$PY" "$HERE/bench.py" --kino "$KINO" --out "$OUTDIR" --work "${WORK:-/tmp/kino-bench-gpu}" \
    --steps "${STEPS:-5}" --guidance "${GUIDANCE:-5}" --timeout "${SIDE_TIMEOUT:-140}" "${ALT[@]}" ${BENCH_ARGS:-}
echo "== done $(date -u); results in $OUTDIR"
