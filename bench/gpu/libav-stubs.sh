#!/usr/bin/env bash
# Stub FFmpeg libraries for running the kino binary on a machine without FFmpeg's shared
# libraries (the GPU image: CUDA and PyTorch, no libavcodec). The binary links libavcodec.so.59,
# libavformat.so.59, libavutil.so.57 and libswscale.so.6 (Debian 12's FFmpeg 5) with BIND_NOW,
# so the loader wants every imported symbol at start even where no MP4 is ever read or written
# (`kino parity`, which the GPU benchmark runs). This builds, from the binary's own imports
# (`nm -D`), one small library per SONAME whose functions print which FFmpeg function was called
# and abort: a benchmark that never touches video files runs; one that does fails loudly.
#
#   bench/gpu/libav-stubs.sh KINO_BINARY OUTDIR      # then LD_LIBRARY_PATH=OUTDIR on that machine
set -euo pipefail
BIN="$1"; OUT="$2"
mkdir -p "$OUT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
nm -D --undefined-only "$BIN" | awk '{print $2}' | grep -E '@(LIBAV|LIBSW)' | sort -u > "$TMP/imports"
for pair in avcodec.so.59:LIBAVCODEC_59 avformat.so.59:LIBAVFORMAT_59 avutil.so.57:LIBAVUTIL_57 \
            swscale.so.6:LIBSWSCALE_6; do
    lib="lib${pair%%:*}"; ver="${pair##*:}"
    syms=$(grep "@$ver\$" "$TMP/imports" | sed 's/@.*//' || true)
    [ -n "$syms" ] || continue
    {
        echo '#include <stdio.h>'
        echo '#include <stdlib.h>'
        for s in $syms; do
            echo "void $s(void) { fprintf(stderr, \"kino: FFmpeg stub: $s called (this machine has no $lib)\\n\"); abort(); }"
        done
    } > "$TMP/$lib.c"
    { echo "$ver {"; echo "  global:"; for s in $syms; do echo "    $s;"; done; echo "  local: *;"; echo "};"; } > "$TMP/$lib.map"
    cc -shared -fPIC -O1 -o "$OUT/$lib" -Wl,-soname,"$lib" -Wl,--version-script="$TMP/$lib.map" "$TMP/$lib.c"
done
ls "$OUT"
