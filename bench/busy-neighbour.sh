#!/usr/bin/env bash
# How much a CPU-heavy neighbour slows Kino's small-model generation (issue 19, item 4).
#
# usage: bench/busy-neighbour.sh [RUNS] [KINO]   (defaults: 7, target/release/kino)
#
# Times `kino generate` with the bundled kino-shapes model (17 frames, 64×64, 20 steps, no
# signing / watermark, PNG frames out) alone, beside 1 busy process, and beside one busy process
# per core; each with Kino's own thread choice (one thread for a small model) and with
# RAYON_NUM_THREADS set to all cores (the old behaviour). Prints the median wall time of RUNS
# runs of each, and the slowdown against the same setting alone.
set -euo pipefail
runs=${1:-7}
kino=${2:-target/release/kino}
cores=$(nproc)
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT

busy() { # start N busy loops in the background
  for _ in $(seq "$1"); do (while :; do :; done) & done
}
stop_busy() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; }

median_time() { # env… — median wall seconds of $runs generations
  local ts=()
  for i in $(seq "$runs"); do
    local s e
    s=$(date +%s.%N)
    env "$@" "$kino" generate "a red square moving right on a black background" --seed "$i" \
      --no-sign --no-watermark -o "$out/run$(date +%s%N)" >/dev/null 2>&1
    e=$(date +%s.%N)
    ts+=("$(echo "$e - $s" | bc -l)")
  done
  printf '%s\n' "${ts[@]}" | sort -g | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)]}'
}

printf '%-34s %10s %16s %22s\n' "threads" "alone (s)" "beside 1 busy" "beside $cores busy"
for setting in "kino's choice" "RAYON_NUM_THREADS=$cores"; do
  envs=()
  [ "$setting" = "kino's choice" ] || envs=("$setting")
  alone=$(median_time "${envs[@]}")
  busy 1; one=$(median_time "${envs[@]}"); stop_busy
  busy "$cores"; all=$(median_time "${envs[@]}"); stop_busy
  printf '%-34s %10s %9s (%.2fx) %15s (%.2fx)\n' "$setting" "$alone" "$one" \
    "$(echo "$one / $alone" | bc -l)" "$all" "$(echo "$all / $alone" | bc -l)"
done
