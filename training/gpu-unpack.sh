#!/usr/bin/env bash
# Makes whole model folders of what training/gpu-job.sh sent back (the files of the device call's
# $OUT, fetched into DIR): DIR/A and DIR/B, each checkpoint as DIR/A/step-N, DIR/B/step-N, with
# the parts the job did not send (B's VAE and text encoder) from the
# repository's models/kino-shapes, as the job's runs used them.
#
#     training/gpu-unpack.sh DIR
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:?usage: gpu-unpack.sh DIR (the folder holding A.tar, B.tar, ...)}"
BASE="$ROOT/models/kino-shapes"
fill() {  # fill FOLDER FROM PARTS...: the PARTS FOLDER lacks, copied from FROM
    local folder="$1" from="$2"; shift 2
    for part in "$@"; do
        [ -e "$folder/$part" ] || cp -r "$from/$part" "$folder/$part"
    done
}
for name in A B; do
    [ -f "$DIR/$name.tar" ] || { echo "gpu-unpack: no $DIR/$name.tar (see $DIR/summary.txt)"; continue; }
    mkdir -p "$DIR/$name"
    tar -xf "$DIR/$name.tar" -C "$DIR/$name"
    [ -f "$DIR/$name-steps.tar" ] && tar -xf "$DIR/$name-steps.tar" -C "$DIR/$name"
    if [ "$name" = A ]; then parts=(); else parts=(vae text_encoder); fi
    fill "$DIR/$name" "$BASE" ${parts[@]+"${parts[@]}"}
    for ck in "$DIR/$name"/step-*; do
        [ -d "$ck" ] || continue
        for f in "$DIR/$name"/*.json; do
            [ "$(basename "$f")" = training.json ] && [ -e "$ck/training.json" ] && continue
            cp "$f" "$ck/"
        done
        fill "$ck" "$DIR/$name" tokenizer scheduler vae text_encoder
    done
    echo "gpu-unpack: $DIR/$name$(cd "$DIR/$name" && ls -d step-* 2>/dev/null | sed 's/^/, /' | tr -d '\n')"
done
