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
# The binary links FFmpeg 5 (libavcodec.so.59, ...), which the GPU image lacks: where the loader
# cannot find them, use the stubs prepare.sh made (bench/gpu/libav-stubs.sh; they abort if a
# video file is ever read or written, which `kino parity` never does).
if ldd "$KINO" | grep -qE "lib(av|sw)[a-z]*\.so.* not found" && [ -d "$HERE/bin/avstub" ]; then
    echo "FFmpeg libraries missing here: using the stubs in bench/gpu/bin/avstub"
    LD_LIBRARY_PATH="$HERE/bin/avstub:$LD_LIBRARY_PATH"
fi
export LD_LIBRARY_PATH
for k in "$KINO" "${ALT[1]:-}"; do
    [ -n "$k" ] || continue
    echo "== $k"; ls -la "$k"; ldd "$k" | grep -E "not found|cuda|cublas|curand|nvrtc|cudnn" || true
    "$k" --version || true
done

[ "${SMOKE_ONLY:-0}" = 1 ] ||
"$PY" "$HERE/bench.py" --kino "$KINO" --out "$OUTDIR" --work "${WORK:-/tmp/kino-bench-gpu}" \
    --steps "${STEPS:-5}" --guidance "${GUIDANCE:-5}" --timeout "${SIDE_TIMEOUT:-140}" "${ALT[@]}" ${BENCH_ARGS:-}
# Smoke test of the conditioned pipelines on the card (issue 15: "the wave's new pipelines ...
# should run once"): every tiny parity fixture of image-to-video, video-to-video, two experts and
# diffusion forcing through `kino parity` on $SMOKE_DEVICE (default cuda), f32, with the
# relative error against the reference printed. Seconds in all. `SMOKE_ONLY=1 SMOKE_DEVICE=cpu
# bench/gpu/run.sh target/release/kino` checks these commands on a CPU machine.
FIX="$HERE/../../fixtures/data"
smoke() {  # NAME COMPONENT CASE INPUT EXPECTED ARGS...
    local name=$1 comp=$2 case=$3 input=$4 expected=$5; shift 5
    echo "== smoke $name ($comp, ${SMOKE_DEVICE:-cuda})"
    timeout 120 "$KINO" parity "$comp" --model "$FIX/$case/model" --input "$FIX/$case/$input" \
        --output "$OUTDIR/smoke-$name.safetensors" --expected "$FIX/$case/$expected" \
        --device "${SMOKE_DEVICE:-cuda}" "$@" || echo "smoke $name FAILED (exit $?)"
}
smoke ti2v pipeline-i2v pipeline-ti2v input.safetensors expected.safetensors --steps 3 --guidance 4
smoke i2v-wan21 pipeline-i2v pipeline-i2v-wan21 input.safetensors expected.safetensors --steps 3 --guidance 5
smoke flf2v pipeline-i2v pipeline-flf2v input.safetensors expected.safetensors --steps 3 --guidance 5
smoke v2v pipeline-v2v pipeline-v2v input-s50.safetensors expected-s50.safetensors --steps 6 --guidance 5 --strength 0.5
smoke a14b-t2v pipeline pipeline-a14b-t2v input.safetensors expected.safetensors --steps 5 --guidance 4
smoke a14b-i2v pipeline-i2v pipeline-a14b-i2v input.safetensors expected.safetensors --steps 5 --guidance 3.5
smoke df-async pipeline-df pipeline-df input-async.safetensors expected-async.safetensors --steps 3 \
    --guidance 5 --num-frames 37 --base-num-frames 21 --overlap-history 5 --ar-step 1 \
    --causal-block-size 2 --fps 24
smoke df-continue pipeline-df pipeline-df input-continue.safetensors expected-continue.safetensors \
    --steps 3 --guidance 5 --num-frames 25 --base-num-frames 17 --overlap-history 5 --fps 24
smoke vace pipeline-vace pipeline-vace input-video-mask.safetensors expected-video-mask.safetensors \
    --steps 4 --guidance 5
echo "== done $(date -u); results in $OUTDIR"
