#!/usr/bin/env bash
# Fetches the photographs the watermark bench pans over (natural-looking clips): 15 CC0 or
# public-domain photos that ship inside scikit-image's wheel (astronaut, camera, chelsea, coffee,
# motorcycle, rocket, Hubble deep field, grass, gravel, brick, coins, moon, retina, IHC, cell; their
# sources and licences are in skimage/data/_fetchers.py). Needs pip and python3.
#   scripts/wm-photos.sh DIR
#   KINO_WM_PHOTOS=DIR nice -n 10 cargo test --release -p kino-watermark --test bench -- --ignored --nocapture
set -euo pipefail
out=${1:?usage: scripts/wm-photos.sh DIR}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps scikit-image==0.26.0 --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 -d "$tmp"
python3 - "$tmp" "$out" <<'PY'
import glob, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
names = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "motorcycle_left.png",
         "rocket.jpg", "hubble_deep_field.jpg", "grass.png", "gravel.png", "brick.png",
         "coins.png", "moon.png", "retina.jpg", "ihc.png", "cell.png"]
z = zipfile.ZipFile(glob.glob(f"{tmp}/scikit_image-*.whl")[0])
for n in names:
    with open(f"{out}/{n}", "wb") as f:
        f.write(z.read(f"skimage/data/{n}"))
print(f"{len(names)} photographs in {out}")
PY
