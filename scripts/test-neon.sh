#!/usr/bin/env bash
# Checks Kino's aarch64 NEON kernels on any machine: cross-compiles
# crates/kino-engine/src/kernels/neon_check.rs (a plain `main` that includes the pure kernel files
# and compares NEON against the portable code) for aarch64-unknown-linux-gnu and runs it under
# qemu-user. Exits non-zero when a check fails.
#
# Needs (Debian bookworm; .ci/run installs them): a rustc that can target aarch64 (Debian's
# `rustc-web` with `libstd-rust-web-dev:arm64`, or rustup's `aarch64-unknown-linux-gnu` target),
# the cross linker `gcc-aarch64-linux-gnu` with `libc6-dev-arm64-cross`, and `qemu-aarch64`
# (`qemu-user`; bookworm-backports has a recent one). On an aarch64 host it runs natively.
# RUSTC / QEMU override the tools.
set -euo pipefail
cd "$(dirname "$0")/.."

src=crates/kino-engine/src/kernels/neon_check.rs
out="${TMPDIR:-/tmp}/kino-neon-check"
target=aarch64-unknown-linux-gnu

if [ -z "${RUSTC:-}" ]; then
  # A rustc with the aarch64 standard library: Debian's system rustc (rustc-web) first, then
  # whatever rustc is on the PATH (rustup with the target added).
  for r in /usr/bin/rustc rustc; do
    if command -v "$r" >/dev/null &&
      [ -d "$("$r" --print sysroot)/lib/rustlib/$target/lib" ]; then
      RUSTC="$r"
      break
    fi
  done
fi
if [ -z "${RUSTC:-}" ]; then
  echo "test-neon.sh: no rustc with the $target standard library (apt-get install rustc-web" \
    "libstd-rust-web-dev:arm64, or rustup target add $target)" >&2
  exit 2
fi

if [ "$(uname -m)" = aarch64 ]; then
  "$RUSTC" --edition 2021 -O "$src" -o "$out"
  "$out"
  exit
fi

command -v aarch64-linux-gnu-gcc >/dev/null || {
  echo "test-neon.sh: no aarch64-linux-gnu-gcc (apt-get install gcc-aarch64-linux-gnu)" >&2
  exit 2
}
QEMU="${QEMU:-qemu-aarch64}"
command -v "$QEMU" >/dev/null || {
  echo "test-neon.sh: no $QEMU (apt-get install qemu-user)" >&2
  exit 2
}
echo "test-neon.sh: $("$RUSTC" --version), target $target, under $("$QEMU" --version | head -1)"
"$RUSTC" --edition 2021 -O --target "$target" -C linker=aarch64-linux-gnu-gcc "$src" -o "$out"
"$QEMU" -L /usr/aarch64-linux-gnu "$out"
