"""Kino against diffusers on one GPU: Wan2.1-T2V-1.3B at 832×480×81, random full-size weights.

One run does everything (no network, no Rust toolchain; a `kino` binary built beforehand):

  1. makes a model folder in diffusers layout with random weights (transformer in bf16, VAE in
     f32, UniPC scheduler of the real repo, model_index.json; no text encoder: both sides take
     prompt embeddings), and the inputs: initial latents [1,16,21,60,104] and prompt / negative
     prompt embeddings [1,512,4096];
  2. runs diffusers' WanPipeline (transformer bf16, PyTorch SDPA, VAE f32, as diffusers' Wan
     example loads them) for N steps with classifier-free guidance, then the VAE decode;
  3. runs `kino parity pipeline --device cuda --dtype bf16 --decode` on the same folder and inputs;
  4. prints and writes (results.json, results.md) per side: time per step (median of the steps
     after the first; the first is reported apart), VAE decode time, peak GPU memory (device
     memory in use, sampled by NVML every 10 ms, over the baseline before the side started; for
     diffusers also torch's max_memory_allocated), the ratios Kino / diffusers, and
     ‖kino − diffusers‖ / ‖diffusers‖ for the final latents and the decoded video.

Each side runs in its own process, one after the other, so that one side's memory does not
count against the other's.

  python3 bench/gpu/bench.py --kino target/release/kino --out OUT            # the real run
  python3 bench/gpu/bench.py --kino target/debug/kino --tiny --device cpu     # logic check, CPU

`--tiny` uses the tiny configuration of fixtures/gen_pipeline.py so the whole flow can be
checked on a CPU in seconds (with `--device cpu` Kino runs in f32 and the diff must be ~1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time

# --------------------------------------------------------------------------------------------
# Configurations

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
WAN21_13B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
    added_kv_proj_dim=None, rope_max_seq_len=1024,
)
# 832×480×81 → latents [1, 16, 21, 60, 104]; UMT5 embeddings padded to 512 tokens.
FULL = dict(latent_shape=(1, 16, 21, 60, 104), text_len=512, text_dim=4096, flow_shift=3.0)
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)
TINY_VAE = dict(
    base_dim=4, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
    latents_mean=[-0.3, 0.2, 0.1, -0.1], latents_std=[1.5, 0.8, 1.2, 0.9],
)
TINY = dict(latent_shape=(1, 4, 3, 4, 6), text_len=8, text_dim=32, flow_shift=3.0)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# 1. model folder and inputs


def reinit_(module, seed: int, device) -> None:
    """Random, non-trivial weights, variance-preserving (as fixtures/gen_pipeline.py), on `device`."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "scale_shift_table" in name:
                v = 0.1 * torch.randn(p.shape, generator=g, device=device)
            elif p.ndim >= 2:
                v = torch.randn(p.shape, generator=g, device=device) / p[0].numel() ** 0.5
            elif name.endswith("bias"):
                v = 0.05 * torch.randn(p.shape, generator=g, device=device)
            else:
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device)
            p.copy_(v.to(p.dtype))


def make_model(root: pathlib.Path, tiny: bool, device: str) -> dict:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from safetensors.torch import save_file

    cfg = TINY if tiny else FULL
    stamp = root / "done.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"tiny": tiny}:
        log(f"model folder {root} already made")
        return cfg
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.device(device):
        transformer = WanTransformer3DModel(**(TINY_TRANSFORMER if tiny else WAN21_13B))
        vae = AutoencoderKLWan(**TINY_VAE) if tiny else AutoencoderKLWan()  # defaults = Wan2.1 VAE
    reinit_(transformer, 1, device)
    reinit_(vae, 2, device)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.3)  # keep the decoded video in a sensible range
    # Full size: transformer stored in bf16 (2.8 GB), VAE in f32; tiny: all f32.
    if not tiny:
        transformer = transformer.to(torch.bfloat16)
    transformer.save_pretrained(root / "transformer", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    del transformer, vae
    UniPCMultistepScheduler(  # scheduler_config.json of the real repo
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
        flow_shift=cfg["flow_shift"], solver_order=2, solver_type="bh2", predict_x0=True,
        lower_order_final=True, final_sigmas_type="zero",
    ).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": [None, None], "tokenizer": [None, None],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    g = torch.Generator().manual_seed(4)
    b, _, _, _, _ = cfg["latent_shape"]
    latents = torch.randn(cfg["latent_shape"], generator=g)
    # UMT5 output rows have norm ~ O(1) per element after its final layer norm.
    pe = torch.randn((b, cfg["text_len"], cfg["text_dim"]), generator=g)
    ne = torch.randn((b, cfg["text_len"], cfg["text_dim"]), generator=g)
    save_file({"latents": latents, "prompt_embeds": pe, "negative_prompt_embeds": ne},
              str(root / "input.safetensors"))
    stamp.write_text(json.dumps({"tiny": tiny}))
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the sides run in their own processes: leave them the memory
    log(f"made model folder {root} in {time.perf_counter() - t0:.1f} s")
    return cfg


# --------------------------------------------------------------------------------------------
# Peak device memory, NVML (falls back to nvidia-smi; none on a CPU run)


class MemoryPoller:
    def __init__(self, device_index: int = 0, period: float = 0.01):
        self.period = period
        self.samples = []
        self._stop = threading.Event()
        self._read = None
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used
        except Exception:  # noqa: BLE001
            try:
                subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True)

                def read():
                    out = subprocess.run(
                        ["nvidia-smi", f"--id={device_index}", "--query-gpu=memory.used",
                         "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True)
                    return int(out.stdout.strip().splitlines()[0]) * 2**20

                self._read = read
                self.period = 0.05
            except Exception:  # noqa: BLE001
                self._read = None
        self.baseline = self._read() if self._read else None

    def __enter__(self):
        if self._read:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(self._read())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        if self._read:
            self._t.join()

    def peak_bytes(self):
        if not self._read or not self.samples:
            return None
        return max(self.samples) - self.baseline


# --------------------------------------------------------------------------------------------
# 2. diffusers side (run in a child process: `bench.py diffusers-side ...`)


def diffusers_side(a) -> None:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from safetensors.torch import load_file, save_file

    root = pathlib.Path(a.model)
    dev = torch.device(a.device)
    tdtype = {"bf16": torch.bfloat16, "f32": torch.float32}[a.dtype]
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    transformer = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=tdtype).to(dev)
    vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=torch.float32).to(dev)
    scheduler = UniPCMultistepScheduler.from_pretrained(root / "scheduler")
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    sync()
    load_s = time.perf_counter() - t0
    inp = load_file(str(root / "input.safetensors"))
    latents = inp["latents"].to(dev)
    pe, ne = inp["prompt_embeds"].to(dev), inp["negative_prompt_embeds"].to(dev)
    _, _, f, h, w = latents.shape
    sf_t, sf_s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    marks = []

    def on_step(_pipe, _i, _t, kw):
        sync()
        marks.append(time.perf_counter())
        return kw

    import contextlib

    attn_ctx = contextlib.nullcontext()
    if a.sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attn_ctx = sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                                "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}[a.sdpa])
    # (The forced backend covers the denoising loop only: the VAE's f32 attention has no flash kernel.)
    with torch.no_grad():
        with attn_ctx:
            sync()
            marks.append(time.perf_counter())
            out = pipe(
                prompt_embeds=pe, negative_prompt_embeds=ne if a.guidance > 1 else None, latents=latents,
                height=h * sf_s, width=w * sf_s, num_frames=(f - 1) * sf_t + 1,
                num_inference_steps=a.steps, guidance_scale=a.guidance, output_type="latent",
                callback_on_step_end=on_step,
            ).frames
            sync()
        final = out.float()
        # The decode of WanPipeline.__call__ (output_type != "latent"), timed on its own.
        t1 = time.perf_counter()
        z = final.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        video = vae.decode(z / std + mean, return_dict=False)[0]
        sync()
        decode_s = time.perf_counter() - t1
    steps = [b - a_ for a_, b in zip(marks, marks[1:])]
    res = {
        "load_s": load_s, "step_s": steps, "decode_s": decode_s,
        "torch_max_allocated": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
        "torch_max_reserved": torch.cuda.max_memory_reserved() if dev.type == "cuda" else None,
        "torch": torch.__version__, "sdpa_backends": sdpa_backends(torch) if dev.type == "cuda" else None,
        "sdpa": a.sdpa,
    }
    save_file({"latents": final.cpu().contiguous(), "video": video.float().cpu().contiguous()}, a.output)
    pathlib.Path(a.timings).write_text(json.dumps(res, indent=2) + "\n")


def sdpa_backends(torch):
    b = torch.backends.cuda
    return {k: bool(getattr(b, f"{k}_sdp_enabled")()) for k in ("flash", "mem_efficient", "math", "cudnn")
            if hasattr(b, f"{k}_sdp_enabled")}


# --------------------------------------------------------------------------------------------
# 3./4. driver


def run_side(name: str, cmd: list[str], env: dict, timeout: float, log_path: pathlib.Path, device_index: int):
    log(f"--- {name}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    with open(log_path, "w") as lf, MemoryPoller(device_index) as mem:
        try:
            p = subprocess.run(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT, timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    if rc != 0:
        log(f"{name} FAILED (rc={rc}); last lines of {log_path}:")
        for line in tail:
            log("   ", line)
    else:
        log(f"{name} done in {wall:.1f} s")
    return {"rc": rc, "wall_s": wall, "nvml_peak_bytes": mem.peak_bytes()}


def rel(a, b):
    import torch

    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("nan")
    return float((a - b).norm() / b.norm())


def summarize(timings: dict) -> dict:
    steps = timings.get("step_s") or []
    later = steps[1:] if len(steps) > 1 else steps
    return {
        "first_step_s": steps[0] if steps else None,
        "step_s": statistics.median(later) if later else None,
        "decode_s": timings.get("decode_s"),
        "load_s": timings.get("load_s"),
    }


def fmt(x, unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3f}{unit}" if abs(x) >= 1e-2 else f"{x:.3e}{unit}"
    return f"{x}{unit}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("side", nargs="?", default="all", choices=["all", "diffusers-side", "make-model"])
    ap.add_argument("--kino", help="path of the kino binary (built with --features cuda)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench-gpu-out", help="results folder")
    ap.add_argument("--work", help="where the model folder goes (default OUT/../ or /tmp)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--tiny", action="store_true", help="tiny model: check the flow in seconds (CPU)")
    ap.add_argument("--device", default="cuda", help="cuda or cpu (cpu: f32 on both sides)")
    ap.add_argument("--dtype", default=None, help="bf16 (GPU default) or f32 (CPU default)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per side")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--skip-kino", action="store_true")
    ap.add_argument("--kino-extra", default="", help="extra arguments for `kino parity`")
    ap.add_argument("--kino-alt", help="a second kino binary (e.g. built with --features cudnn), run after")
    ap.add_argument("--kino-alt-name", default="kino-cudnn", help="its column name")
    ap.add_argument("--sdpa", default="default", choices=["default", "flash", "efficient", "math", "cudnn"],
                    help="diffusers side: force this PyTorch SDPA backend")
    ap.add_argument("--references", default="",
                    help="extra diffusers sides, comma-separated: f32 (transformer in f32: the yardstick for "
                         "bf16 error), flash|efficient|math|cudnn (bf16 with that SDPA backend); run after Kino")
    ap.add_argument("--reference-timeout", type=float, default=None, help="seconds for each extra side")
    # diffusers-side internals
    ap.add_argument("--model")
    ap.add_argument("--output")
    ap.add_argument("--timings")
    a = ap.parse_args()
    if a.dtype is None:
        a.dtype = "bf16" if a.device.startswith("cuda") else "f32"

    if a.side == "diffusers-side":
        diffusers_side(a)
        return

    out = pathlib.Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(a.work or "/tmp/kino-bench-gpu").resolve()
    model = work / ("model-tiny" if a.tiny else "model-wan21-1.3b")
    device_index = int(a.device.split(":")[1]) if ":" in a.device else 0
    cfg = make_model(model, a.tiny, "cuda" if a.device.startswith("cuda") else "cpu")
    if a.side == "make-model":
        return
    env = dict(os.environ)
    results = {"steps": a.steps, "guidance": a.guidance, "dtype": a.dtype, "device": a.device,
               "latent_shape": cfg["latent_shape"], "tiny": a.tiny, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import torch

        if a.device.startswith("cuda") and torch.cuda.is_available():
            results["card"] = torch.cuda.get_device_name(device_index)
    except Exception:  # noqa: BLE001
        pass

    sides = {}
    if not a.skip_diffusers:
        r = run_side("diffusers", [sys.executable, __file__, "diffusers-side", "--model", str(model),
                                   "--output", str(out / "diffusers.safetensors"),
                                   "--timings", str(out / "diffusers_timings.json"),
                                   "--steps", str(a.steps), "--guidance", str(a.guidance),
                                   "--device", a.device, "--dtype", a.dtype],
                     env, a.timeout, out / "diffusers.log", device_index)
        if r["rc"] == 0:
            t = json.loads((out / "diffusers_timings.json").read_text())
            r.update(summarize(t))
            r["timings"] = t
        sides["diffusers"] = r
    kinos = [] if a.skip_kino else [("kino", a.kino)]
    if a.kino_alt and not a.skip_kino:
        kinos.append((a.kino_alt_name, a.kino_alt))
    for name, binary in kinos:
        if not binary:
            sys.exit("--kino PATH is required (or --skip-kino)")
        cmd = [binary, "parity", "pipeline", "--model", str(model), "--input", str(model / "input.safetensors"),
               "--output", str(out / f"{name}.safetensors"), "--steps", str(a.steps), "--guidance", str(a.guidance),
               "--device", a.device, "--dtype", a.dtype, "--decode", "--timings", str(out / f"{name}_timings.json")]
        cmd += a.kino_extra.split()
        # Per-event progress lines in the log, so a side killed by the timeout still shows how far it got.
        kenv = dict(env, KINO_LOG=env.get("KINO_LOG", "info"))
        r = run_side(name, cmd, kenv, a.timeout, out / f"{name}.log", device_index)
        if r["rc"] == 0:
            t = json.loads((out / f"{name}_timings.json").read_text())
            r.update(summarize(t))
            r["timings"] = t
        sides[name] = r
    refs = [r.strip() for r in a.references.split(",") if r.strip()]
    for ref in refs:
        rname = f"diffusers-{ref}"
        rdtype, sdpa = ("f32", "default") if ref == "f32" else (a.dtype, ref)
        r = run_side(rname, [sys.executable, __file__, "diffusers-side", "--model", str(model),
                             "--output", str(out / f"{rname}.safetensors"),
                             "--timings", str(out / f"{rname}_timings.json"),
                             "--steps", str(a.steps), "--guidance", str(a.guidance),
                             "--device", a.device, "--dtype", rdtype, "--sdpa", sdpa],
                     env, a.reference_timeout or a.timeout, out / f"{rname}.log", device_index)
        if r["rc"] == 0:
            t = json.loads((out / f"{rname}_timings.json").read_text())
            r.update(summarize(t))
            r["timings"] = t
        sides[rname] = r
    results["sides"] = sides

    results["rel_diff"] = {}
    if "diffusers" in sides and sides["diffusers"]["rc"] == 0:
        from safetensors.torch import load_file

        d = load_file(str(out / "diffusers.safetensors"))
        for name, _ in kinos:
            if sides[name]["rc"] == 0:
                k = load_file(str(out / f"{name}.safetensors"))
                results["rel_diff"][name] = {n: rel(k[n], d[n]) for n in ("latents", "video") if n in k and n in d}
                del k
    # Every side against every reference side (the f32 one is the yardstick: how far each bf16
    # run, diffusers' own included, lands from the same maths in f32).
    results["rel_diff_pairs"] = {}
    ok = [n for n, r in sides.items() if r["rc"] == 0]
    if ok:
        from safetensors.torch import load_file

        done = []
        for ref in [n for n in ok if n.startswith("diffusers")]:
            rt = load_file(str(out / f"{ref}.safetensors"))
            done.append(ref)
            for name in ok:
                if name in done:  # itself, or a pair already given the other way round
                    continue
                k = load_file(str(out / f"{name}.safetensors"))
                results["rel_diff_pairs"][f"{name} vs {ref}"] = {
                    n: rel(k[n], rt[n]) for n in ("latents", "video") if n in k and n in rt}
                del k
            del rt

    write_report(results, out)


def write_report(results: dict, out: pathlib.Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    s = results["sides"]
    d = s.get("diffusers", {})
    kinos = [n for n in s if n != "diffusers"]  # every other column: Kino builds, diffusers variants

    def ratio(k, key):
        try:
            return k[key] / d[key]
        except (KeyError, TypeError, ZeroDivisionError):
            return None

    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    rows = [
        ("time per step, s (median after the 1st)", "step_s", None),
        ("first step, s", "first_step_s", None),
        ("VAE decode, s", "decode_s", None),
        ("peak GPU memory (NVML, over baseline), GiB", "nvml_peak_bytes", gib),
        ("load, s", "load_s", None),
        ("whole side wall time, s", "wall_s", None),
    ]
    head = "| | diffusers |" + "".join(f" {n} | {n} / diffusers |" for n in kinos)
    lines = [
        f"card: {results.get('card', 'n/a')}; date: {results['date']}; steps: {results['steps']}; "
        f"guidance: {results['guidance']}; dtype: {results['dtype']}; latents: {results['latent_shape']}"
        + ("; TINY" if results["tiny"] else ""),
        "",
        head,
        "|---|---|" + "---|---|" * len(kinos),
    ]
    for label, key, conv in rows:
        conv = conv or (lambda v: v)
        cells = [fmt(conv(d.get(key)))]
        for n in kinos:
            cells += [fmt(conv(s[n].get(key))), fmt(ratio(s[n], key))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tma = (d.get("timings") or {}).get("torch_max_allocated")
    lines.append(f"| torch max_memory_allocated, GiB | {fmt(gib(tma))} |" + " | |" * len(kinos))
    for what in ("latents", "video"):
        cells = [""]
        for n in kinos:
            cells += [fmt((results.get("rel_diff") or {}).get(n, {}).get(what)), ""]
        lines.append(f"| ‖kino − diffusers‖/‖diffusers‖, {what} | " + " | ".join(cells) + " |")
    pairs = results.get("rel_diff_pairs") or {}
    if pairs:
        lines += ["", "| relative difference | latents | video |", "|---|---|---|"]
        for pair, v in pairs.items():
            lines.append(f"| {pair} | {fmt(v.get('latents'))} | {fmt(v.get('video'))} |")
    for name, side in s.items():
        if side.get("rc") != 0:
            lines.append(f"\n{name} FAILED (rc={side.get('rc')}), see {name}.log")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
