"""Kino against stable-diffusion.cpp on the same machine, in the same run: one Wan2.1-1.3B
transformer forward (256×256 × 17 frames = 1,280 video tokens, 512 text tokens) per weight
format, and one Wan2.1 VAE decode of that latent; time and peak memory for each (issue 19).

    python bench/sdcpp/bench.py --sdcpp SRC [--kino target/release/kino] [--threads 2]
                                [--formats f32,f16,q8_0,q4_k] [--isa native|avx2] [--work DIR]

SRC is a stable-diffusion.cpp source tree with its `ggml` submodule (e.g. `git clone --recursive
https://github.com/leejet/stable-diffusion.cpp`); the script builds its `sd-cli` there
(CMake, Release, native CPU flags as its own build picks them, no GPU backend) unless
SRC/build/bin/sd-cli exists. `--isa avx2` runs both sides as on an AVX2-only CPU where the
machine has AVX-512: sd-cli built in SRC/build-avx2 with ggml's x86 options for a Haswell-class
CPU (AVX2, FMA, F16C, BMI2; no AVX-512, no AVX-VNNI; `GGML_NATIVE` off), Kino with
`KINO_CPU_ISA=avx2`. (The README's numbers come from a snapshot of its repository
that lacked the generated tokenizer headers under src/tokenizers/vocab/: `python
bench/sdcpp/stub_vocab.py SRC` writes them, UMT5's from the fixture tokenizer's 300 pieces to
match `make_umt5.py`; a real clone has them all.)

Both sides read the same random weights: the 1.3B folder `kino bench video` writes (under
--work, default $TMPDIR/kino-bench-wan2.1-1.3b-random) and its transformer in GGUF as `kino
quantize` writes it (original Wan tensor names, as the community's GGUF files have them).
stable-diffusion.cpp's f32 row loads the F16 file with `--type f32` (its matrices widened to f32
at load; the same arithmetic as an f32 file). It also needs a UMT5 text encoder: a one-block
encoder of Wan's width (`make_umt5.py`), so its text stage is short and small.

stable-diffusion.cpp runs `-M vid_gen --steps 1 --cfg-scale 1 --diffusion-fa` (one
transformer forward, no unconditional pass; flash attention in the transformer, as every Wan
command of its docs/wan.md runs it; `--no-fa` leaves it out, as the README's tables before stop
59 did) and decodes the latent (in the first format's run only: the decode is the same in
every run, so later runs are stopped once sampling is done); its times are the ones it logs
for `sampling` and `decode_first_stage`, less the weight loading it logs inside them (it loads the transformer when
sampling starts; Kino's rows time a loaded model). Its logs are kept in --work as sdcpp-FORMAT.log. Peak memory is its resident set sampled every 50 ms, the highest while
each stage runs (it loads each model's weights when first used and keeps them all until it
exits), less the weights of the models the stage does not use, as it reports them ("total params
memory size"): so the transformer row counts the transformer's weights and working memory, not
the text encoder's, as Kino's transformer process does. Kino's rows come from `kino
bench transformer --format … --no-reference` and `kino bench vae --no-reference` (one process per
row, peak = the process's high-water mark). Not a CI test: run it by hand; it prints the table
the README quotes.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent


# ggml's x86 options for a Haswell-class CPU: AVX2, FMA, F16C, BMI2 and nothing newer (no
# AVX-512, no AVX-VNNI), instead of what the build machine has (`GGML_NATIVE`).
AVX2_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON",
              "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=OFF",
              "-DGGML_AVX512=OFF"]


def build_sdcpp(src: pathlib.Path, threads: int, isa: str) -> pathlib.Path:
    build = "build" if isa == "native" else f"build-{isa}"
    exe = src / build / "bin" / "sd-cli"
    if exe.is_file():
        return exe
    print(f"building stable-diffusion.cpp in {src}/{build} …", file=sys.stderr)
    subprocess.run(["cmake", "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DSD_WEBP=OFF",
                    "-DSD_WEBM=OFF", "-DSD_SERVER_BUILD_FRONTEND=OFF"]
                   + (AVX2_FLAGS if isa == "avx2" else []), cwd=src, check=True)
    subprocess.run(["cmake", "--build", build, "-j", str(threads), "--target", "sd-cli"],
                   cwd=src, check=True)
    return exe


def kino_table(kino: str, what: str, formats: list[str], threads: int, work: pathlib.Path,
               isa: str):
    """{row name: (seconds, peak GB)} from `kino bench … --no-reference`."""
    cmd = [kino, "bench", what, "--no-reference", "--threads", str(threads),
           "--model-dir", str(work)]
    if what == "transformer":
        cmd += ["--format", ",".join(formats)]
    env = dict(os.environ)
    if isa != "native":
        env["KINO_CPU_ISA"] = isa
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+(?: \S+)?)\s+-\s+([\d.]+)\s+-\s+-\s+([\d.]+)\s+-$", line.strip())
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_sdcpp(exe, args, threads, stop_after=None):
    """Runs sd-cli; returns (log lines with their times, [(time, rss)]). With `stop_after` (a
    regular expression) it is stopped once a line matches (the decode that follows sampling
    is the same in every format's run: timed in the first only)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    p = subprocess.Popen([str(exe)] + args + ["--threads", str(threads), "-v"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples, lines = [], []

    def poll():
        while p.poll() is None:
            samples.append((time.monotonic(), rss_bytes(p.pid)))
            time.sleep(0.05)

    t = threading.Thread(target=poll)
    t.start()
    stopped = False
    for line in p.stdout:
        lines.append((time.monotonic(), line.rstrip()))
        if stop_after and not stopped and re.search(stop_after, line):
            p.terminate()
            stopped = True
    p.wait()
    t.join()
    if p.returncode != 0 and not stopped:
        tail = "\n".join(line for _, line in lines[-30:])
        raise SystemExit(f"sd-cli failed ({p.returncode}):\n{tail}")
    return lines, samples


def stage(lines, samples, start_pat, end_pat):
    """(seconds it logs less the weight loading it logs inside the stage, the loading's
    seconds, peak RSS bytes between the two log lines). stable-diffusion.cpp loads a model's
    weights when the stage that uses it starts (the transformer's inside `sampling`), while
    Kino's rows time the forward of a loaded model: the loading is taken out."""
    i0 = next(i for i, (_, line) in enumerate(lines) if re.search(start_pat, line))
    i1 = next(i for i, (_, line) in enumerate(lines) if i > i0 and re.search(end_pat, line))
    (t0, _), (t1, line) = lines[i0], lines[i1]
    secs = float(re.search(r"taking ([\d.]+)\s*s", line).group(1))
    load = sum(float(m.group(1)) for _, l in lines[i0:i1]
               if (m := re.search(r"loading tensors completed, taking ([\d.]+)\s*s", l)))
    peak = max((r for t, r in samples if t0 <= t <= t1), default=0)
    return secs - load, load, peak


def params_mb(lines):
    """stable-diffusion.cpp's own account of its weights in memory, MB per model."""
    line = next(line for _, line in lines if "total params memory size" in line)
    return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)MB\(RAM\)", line)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdcpp", type=pathlib.Path, required=True,
                    help="stable-diffusion.cpp source tree (with ggml)")
    ap.add_argument("--kino", default=str(HERE.parent.parent / "target" / "release" / "kino"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="f32,f16,q8_0,q4_k")
    ap.add_argument("--no-fa", action="store_true",
                    help="run sd-cli without --diffusion-fa (the README's tables before stop 59)")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: both sides as on an AVX2-only CPU: sd-cli built without AVX-512 "
                         "or VNNI (in SRC/build-avx2), Kino with KINO_CPU_ISA=avx2")
    ap.add_argument("--work", type=pathlib.Path,
                    default=pathlib.Path(tempfile.gettempdir()) / "kino-bench-wan2.1-1.3b-random")
    a = ap.parse_args()
    formats = [f.strip().lower() for f in a.formats.split(",") if f.strip()]
    exe = build_sdcpp(a.sdcpp.resolve(), a.threads, a.isa)

    print("Kino: transformer and VAE …", file=sys.stderr)
    # Also makes the random folder and the GGUF files the other side reads (the F16 one for
    # stable-diffusion.cpp's f32 row too).
    kino = kino_table(a.kino, "transformer", formats if "f16" in formats else formats + ["f16"],
                      a.threads, a.work, a.isa)
    kino.update(kino_table(a.kino, "vae", [], a.threads, a.work, a.isa))

    umt5 = a.work / "umt5-1block.safetensors"
    if not umt5.is_file():
        subprocess.run([sys.executable, str(HERE / "make_umt5.py"), str(umt5)], check=True)

    rows = []
    vae_row = None
    with tempfile.TemporaryDirectory() as tmp:
        for f in formats:
            # The files `kino bench` made (named with `kino quantize`'s recipe version).
            model = max(a.work.glob(f"transformer-{'f16' if f == 'f32' else f}-r*.gguf"),
                        key=lambda p: int(p.stem.rsplit("-r", 1)[1]))
            args = ["-M", "vid_gen", "--diffusion-model", str(model),
                    "--vae", str(a.work / "vae" / "diffusion_pytorch_model.safetensors"),
                    "--t5xxl", str(umt5), "-p", "", "-W", "256", "-H", "256",
                    "--video-frames", "17", "--steps", "1", "--cfg-scale", "1",
                    "--sampling-method", "euler", "--seed", "1", "-o", f"{tmp}/out.webp"]
            if f == "f32":
                args += ["--type", "f32"]
            if not a.no_fa:
                args += ["--diffusion-fa"]
            print(f"stable-diffusion.cpp: {f} …", file=sys.stderr)
            lines, samples = run_sdcpp(exe, args, a.threads,
                                       None if vae_row is None else r"sampling completed, taking")
            log = a.work / f"sdcpp-{f}{'' if a.isa == 'native' else '-' + a.isa}.log"
            log.write_text("".join(line + "\n" for _, line in lines))
            sd_t, sd_load, sd_m = stage(lines, samples, r"get_learned_condition completed",
                                        r"sampling completed, taking")
            print(f"stable-diffusion.cpp: {f}: forward {sd_t:.2f} s (+ {sd_load:.2f} s loading "
                  f"its weights); log {log}", file=sys.stderr)
            # It keeps every model's weights until it exits: the transformer stage's peak less
            # the text encoder's weights, the decode's less the text encoder's and the
            # transformer's, so each stage counts what Kino's process for it holds.
            mb = params_mb(lines)
            sd_m -= mb.get("text_encoders", 0) * 1e6
            name = "transformer" if f == "f32" else f"transformer {f}"
            rows.append((name, sd_t, sd_m / 1e9, *kino[name]))
            if vae_row is None:
                dec_t, dec_load, dec_m = stage(lines, samples, r"sampling completed",
                                               r"decode_first_stage completed, taking")
                print(f"stable-diffusion.cpp: decode {dec_t:.2f} s (+ {dec_load:.2f} s)",
                      file=sys.stderr)
                dec_m -= (mb.get("text_encoders", 0) + mb.get("diffusion_model", 0)) * 1e6
                vae_row = ("vae", dec_t, dec_m / 1e9, *kino["vae"])
    rows.append(vae_row)
    print(f"{a.threads} threads; CPU kernels {a.isa}; stable-diffusion.cpp {exe}")
    print(f"{'component':<18} {'sd.cpp s':>10} {'Kino s':>10} {'sd/Kino':>8} "
          f"{'sd.cpp GB':>10} {'Kino GB':>10} {'Kino/sd':>8}")
    for name, st, sm, kt, km in rows:
        print(f"{name:<18} {st:>10.2f} {kt:>10.2f} {st / kt:>8.2f} {sm:>10.2f} {km:>10.2f} "
              f"{km / sm:>8.2f}")


if __name__ == "__main__":
    main()
