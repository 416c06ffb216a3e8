#!/usr/bin/env bash
# Makes the Kino outputs the watermark bench marks: 24 unmarked clips of the bundled kino-shapes
# model (17 frames, 64×64), the 8 prompts below at seeds 11–18, 21–28 and 31–38, as folders of
# PNG frames DIR/r{0,1,2}c{0..7}. The bench upscales them to 256×256 and also reads them native.
# ROUNDS other than 0-2 give more clips: rounds R use seeds 11 + 10·R … (3-5: seeds 41–68).
#   scripts/wm-kino-clips.sh DIR [KINO] [ROUNDS]   (KINO: default target/release/kino; ROUNDS: "0 1 2")
#   KINO_WM_KINO_CLIPS=DIR nice -n 10 cargo test --release -p kino-watermark --test bench -- --ignored --nocapture
set -euo pipefail
out=${1:?usage: scripts/wm-kino-clips.sh DIR [KINO]}
kino=${2:-target/release/kino}
rounds=${3:-0 1 2}
prompts=(
    "a red circle moving right on a black background"
    "a blue square moving left on a white background"
    "a green triangle moving up on a gray background"
    "a yellow circle moving down on a black background"
    "a purple square moving right on a gray background"
    "an orange triangle moving left on a white background"
    "a white circle moving up on a gray background"
    "a red square moving down on a white background"
)
mkdir -p "$out"
for r in $rounds; do
    for i in "${!prompts[@]}"; do
        "$kino" generate "${prompts[$i]}" --seed $((11 + 10 * r + i)) --no-watermark --no-sign \
            -o "$out/r${r}c$i"
    done
done
