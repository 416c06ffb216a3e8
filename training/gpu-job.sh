#!/usr/bin/env bash
# The shapes models' training that a 2-core CPU box cannot do in a session, prepared as ONE call
# of a lent GPU (the device tool: about 15 minutes of device time per session, 10 per call).
# Run from the repository root on the GPU machine (python3 with PyTorch and CUDA; no network):
#
#     training/gpu-job.sh            # device call: timeout_s 600, carry ["bench/gpu/wheels"]
#
# Two jobs share the card side by side (both models are tiny, so on a card they are bound by
# kernel launches and the pair should cost little more than one; not measured yet), each on the
# clock, saving checkpoints as it goes so a cut run still returns something:
#   A  kino-shapes' transformer and text encoder trained on (patch 1x4x4 on its 2x VAE with 4
#      latent channels), going on from the shipped ones (CPU runs r25-r29, models/kino-shapes/
#      README.md) with the recipe of those runs at a GPU's batch.
#   B  a VACE branch for the shipped kino-shapes, from scratch (kino-shapes-vace's branch is on the
#      previous kino-shapes, whose latent it was made for), with the teacher, the teacher's hidden
#      states, the head that must recognise the reference's shape (--aux-ref), 15 more drawings
#      of every reference and half of them aligned (issue 13's reference shape;
#      models/kino-shapes-vace/README.md, runs 7, 8 and 10).
# Results in $OUT (at most 8 files come back from a call): summary.txt, A.log, B.log, A.tar and
# B.tar (A's whole folder; B's without the VAE and text encoder it leaves as kino-shapes has
# them), A-steps.tar and B-steps.tar (the latest checkpoints that fit 16 MiB). Back on the build
# machine `training/gpu-unpack.sh DIR` makes whole model folders of them (the VAE, tokenizer and
# scheduler from the repository); check B with `training/vace_probe.py --model DIR/B` before
# spending an evaluation.
#
#     SMOKE=1 training/gpu-job.sh    # both jobs for a few steps on the CPU (what the test runs)
#
# Knobs (environment): A_MINUTES (4.5), B_MINUTES (6.5, the whole run with its 1,500 samples and
# 12,375 reference drawings), A_FROM / B_FROM (a folder an earlier call made, unpacked inside the
# repository: A resumes it, `--dit-resume`, models/kino-shapes when unset; B starts from its
# branch and main blocks, `--init`, a new branch when unset; the carry limit of 64 MiB then needs room, see
# bench/gpu/NOTES.md "Carry"), PYTHON (python3), OUT (./out/gpu-job), DEVICE (cuda).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/out/gpu-job}"
mkdir -p "$OUT"
SMOKE="${SMOKE:-0}"
DEVICE="${DEVICE:-cuda}"
[ "$SMOKE" = 1 ] && DEVICE=cpu
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT/summary.txt") 2>&1
echo "gpu-job: $(date -u +%FT%TZ) on $(uname -n), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# diffusers is not in the GPU image: install carried wheels (to /tmp/site: the image's
# site-packages may be read-only). On the build machine: `python3 -m pip download --no-deps
# --only-binary=:all: -d bench/gpu/wheels diffusers==0.42.1 importlib_metadata` (prepare.sh does
# it too), then carry bench/gpu/wheels.
if ! "$PY" -c "import diffusers" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site bench/gpu/wheels/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || {
        echo "gpu-job: diffusers is missing and bench/gpu/wheels/ has no wheels (see above)"
        exit 2
    }
fi
"$PY" - <<'EOF' || exit 2
import torch, diffusers, transformers, numpy
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, numpy {numpy.__version__}")
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(0))
EOF
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu-job: torch sees no CUDA device (SMOKE=1 runs the jobs on the CPU)"
    exit 2
fi

if [ "$SMOKE" = 1 ]; then
    THREADS=1
    A_ARGS=(--smoke --save-every 1)
    B_ARGS=(--smoke --steps 3 --save-every 2 --ref-variants 2)
else
    THREADS=8
    A_ARGS=(--dit-steps 100000 --dit-max-minutes "${A_MINUTES:-4.5}" --dit-batch 64 --dit-lr 3e-4
            --dit-shift 10 2 --object-weight 0 --shape-weight 8 --image-cond 0.7
            --cond-roundtrip 0.5 --cond-blur 0.5 --cond-noise 0.05 --clips 16000
            --encode-batch 64 --save-every 1000)
    B_ARGS=(--steps 100000 --max-minutes "${B_MINUTES:-6.5}" --batch 64 --lr 4e-4 --samples 1500
            --save-every 2000 --ref-variants 15
            --tasks reference=0.55,edit=0.2,continue=0.13,text=0.06,image=0.06)
fi

# A: the transformer and text encoder on the 2x VAE.
A_INIT=(--dit-resume "${A_FROM:-models/kino-shapes}")
"$PY" training/train.py --out "$WORK/A" --device "$DEVICE" --threads "$THREADS" \
    --vae-from models/kino-shapes/vae --patch-size 1 4 4 \
    "${A_INIT[@]}" "${A_ARGS[@]}" > "$OUT/A.log" 2>&1 &
A_PID=$!
# B: a VACE branch (the main blocks frozen) on kino-shapes' main blocks, new or from B_FROM.
if [ -n "${B_FROM:-}" ]; then B_INIT=(--init "$B_FROM"); else B_INIT=(); fi
"$PY" training/train_vace.py --out "$WORK/B" --device "$DEVICE" --threads "$THREADS" \
    "${B_INIT[@]}" --object-weight 6 --shape-weight 8 \
    --distill 12 --feature-distill 6 --aux-ref 1 --aux-min-sigma 0.7 --ref-aligned 0.5 \
    "${B_ARGS[@]}" \
    > "$OUT/B.log" 2>&1 &
B_PID=$!
wait "$A_PID"; A_RC=$?
wait "$B_PID"; B_RC=$?

# What comes back from a device call is at most 8 files of 16 MiB: one tar per model (PARTS of
# its folder and its JSON files) and one of its checkpoints (the same but the VAE), the latest
# first while they fit.
pack() {  # pack DIR NAME PARTS...: DIR's final folder (PARTS of it) and its step-N/ checkpoints
    local dir="$1" name="$2"; shift 2
    [ -d "$dir" ] || { echo "gpu-job: $name made no folder"; return 0; }
    (cd "$dir" && tar -cf "$OUT/$name.tar" --ignore-failed-read *.json "$@" 2>/dev/null)
    local cks=() ck
    for ck in $(cd "$dir" && ls -d step-* 2>/dev/null | sort -t- -k2 -rn); do
        cks+=("$ck")
        local list=()
        for c in "${cks[@]}"; do for part in "$@" training.json; do
            # a checkpoint's VAE is the final folder's
            [ "$part" != vae ] && [ -e "$dir/$c/$part" ] && list+=("$c/$part"); done; done
        (cd "$dir" && tar -cf "$OUT/$name-steps.tar.new" "${list[@]}")
        if [ "$(stat -c %s "$OUT/$name-steps.tar.new")" -gt $((16 * 1024 * 1024 - 65536)) ]; then
            rm -f "$OUT/$name-steps.tar.new"; break; fi
        mv "$OUT/$name-steps.tar.new" "$OUT/$name-steps.tar"
    done
}
pack "$WORK/A" A transformer text_encoder vae tokenizer scheduler
pack "$WORK/B" B transformer tokenizer scheduler
for job in A B; do
    echo "--- $job: last lines of $job.log"
    grep -v "Loading weights\|Writing model shards" "$OUT/$job.log" | tail -n 4
done
echo "gpu-job: A exit $A_RC, B exit $B_RC; $(du -sh "$OUT" | cut -f1) in $OUT"
[ "$A_RC" = 0 ] && [ "$B_RC" = 0 ]
