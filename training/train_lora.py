"""Train LoRA adapters for kino-shapes with the reference's PEFT tooling (diffusers + peft).

    python training/train_lora.py concept --out models/kino-shapes/lora/diagonal.safetensors
    python training/train_lora.py fast    --out models/kino-shapes/lora/fast.safetensors
    python training/train_lora.py concept --out /tmp/p.safetensors --smoke   # checks the script

Both adapt only the transformer of a kino-shapes folder (`--base`, default models/kino-shapes),
frozen, through `transformer.add_adapter(LoraConfig(...))`, and are written with
`WanPipeline.save_lora_weights` (diffusers/PEFT naming with `lora_adapter_metadata`), so the file
loads in diffusers (`pipe.load_lora_weights`) and in Kino (`--lora FILE`) alike. A `kino` entry
in the file's safetensors metadata (JSON) records what it is and, for `fast`, the preset that
`kino generate --lora FILE --preset fast` applies.

concept: a motion the base model has never seen, "diagonally" (up and to the right, 45°). The
  base's word-level tokenizer has no such word: it reads as `<unk>`, a token no training caption
  ever held, so the base moves the object along one axis (measured: `kino eval --cases
  OUT.eval.json` without the adapter). Half the training clips move diagonally (every colour,
  shape and background, less the held-out combinations written to the eval file), half are the
  base's own training world, so that the rest of what the base does stays. An honest limit: any
  out-of-vocabulary word in the motion slot is `<unk>` too, so with this adapter loaded every
  unknown motion word moves diagonally.

  Why a motion and not a new colour or filled/outlined style: the base's VAE (1.9 M parameters,
  trained on the palette only) cannot carry them. Measured round trips (encode, decode) of a
  drawn clip: pink (236,113,179) comes back (164,47,30), cyan (38,188,197) as (18,14,57), an
  outlined square comes back filled in (PSNR 18 dB), a blue background greys its object; a
  transformer adapter cannot draw what the decoder cannot. An earlier pink adapter (800 steps,
  attention + feed-forward + text projection) matched diffusers to 5e-6 in Kino and drew red:
  0% pink. Where a palette object is and how it moves, the VAE does carry.

fast: a few-step student without guidance, by rectified-flow "reflow" (Liu et al. 2022, the
  2-rectified flow): the base (the teacher) samples pairs (noise, video) with its default sampler
  (UniPC, 20 steps, guidance 3); the adapter is trained with the flow-matching loss on the straight
  line between each pair, conditioned on the prompt without caption dropout. On straight paths few
  solver steps suffice, and the guidance is baked in (the teacher's videos are guided ones). Noise
  levels are drawn half at the 4-step schedule's own sigmas, half shifted-uniform.

The configuration, the machine, the times and the losses go to OUT with `.json` in place of
`.safetensors`; `concept` also writes OUT with `.eval.json`: the kino-eval.json of the diagonal
held-out cases (motions with "diagonally") that `kino eval --cases` reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import random
import sys
import time

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train  # noqa: E402  (the base model's training helpers)
import world  # noqa: E402

DIAGONAL = "diagonally"
# Up and to the right (image y grows downward), unit length: the travel is along the diagonal.
DIAGONAL_DIRECTION = (math.sqrt(0.5), -math.sqrt(0.5))
DIAGONAL_WORDS = ["moving diagonally", "moves diagonally", "going diagonally",
                  "drifting diagonally", "heading diagonally", "sliding diagonally"]

CONFIG = {
    "seed": 0,
    "lora": {"r": 16, "lora_alpha": 16,
             "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]},
    # `extra_targets`: more modules for the concept adapter only. Adapting the text projection
    # (`condition_embedder.text_embedder.linear_1/2`) as well moved every prompt's embedding and
    # cost the base's shapes 5 points (600 steps, 60% diagonal clips: shape 84.4% -> 79.2%), so
    # the shipped one adapts what the few-step one does.
    "concept": {"name": DIAGONAL, "held_out": 12, "clips": 1200, "extra_targets": [],
                "concept_fraction": 0.5, "steps": 800, "batch": 16, "lr": 1e-3, "warmup": 20,
                "flow_shift": [10.0, 2.0], "shape_weight": 8.0, "shape_max_sigma": 0.8},
    "fast": {"pairs": 512, "teacher_steps": 20, "teacher_guidance": 3.0, "teacher_batch": 64,
             "steps": 400, "batch": 16, "lr": 1e-3, "warmup": 20, "student_steps": 4,
             "schedule_fraction": 0.5, "flow_shift": 5.0},
}

SMOKE = {"concept": {"clips": 4, "steps": 2, "batch": 2, "held_out": 2},
         "fast": {"pairs": 4, "teacher_batch": 2, "teacher_steps": 2, "steps": 2, "batch": 2}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_base(base: pathlib.Path):
    """The base folder's parts, as stock diffusers / transformers classes, on the CPU."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")
    text_encoder = UMT5EncoderModel.from_pretrained(base / "text_encoder").eval()
    # The safetensors directly: WanTransformer3DModel.from_pretrained wants `accelerate`.
    from safetensors.torch import load_file

    transformer = WanTransformer3DModel.from_config(
        WanTransformer3DModel.load_config(base / "transformer"))
    transformer.load_state_dict(load_file(base / "transformer" / "diffusion_pytorch_model.safetensors"))
    vae = AutoencoderKLWan.from_pretrained(base / "vae").eval()
    scheduler = UniPCMultistepScheduler.from_pretrained(base / "scheduler")
    kino = json.loads((base / "kino.json").read_text())
    for m in (text_encoder, transformer, vae):
        for p in m.parameters():
            p.requires_grad_(False)
    return tokenizer, text_encoder, transformer, vae, scheduler, kino


def add_lora(transformer, cfg):
    from peft import LoraConfig

    config = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], init_lora_weights=True,
                        target_modules=cfg["target_modules"])
    transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    log(f"LoRA r={cfg['r']}: {sum(p.numel() for p in params) / 1e3:.1f} k trainable parameters")
    return config, params


def encode_clips(vae, clips):
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return ((train.encode_mean(vae, train.to_tensor(clips)) - mean) / std).float()


def lr_at(t, step):
    frac = step / max(t["steps"], 1)
    return train.warmup_cosine(t["lr"], step, t["warmup"], frac)


def fit(transformer, text_encoder, tokenizer, params, t, max_len, sample, record, name):
    """The flow-matching loop shared by both adapters: `sample(rng, g)` gives one batch
    (x0, noise, sigma [B], prompts, weight or None)."""
    opt = torch.optim.AdamW(params, lr=t["lr"], weight_decay=0.0, betas=(0.9, 0.99))
    rng = random.Random(CONFIG["seed"] + 21)
    g = torch.Generator().manual_seed(CONFIG["seed"] + 22)
    losses, start = [], time.time()
    transformer.train()
    for step in range(t["steps"]):
        lr = lr_at(t, step)
        for group in opt.param_groups:
            group["lr"] = lr
        x0, noise, sigma, prompts, weight = sample(rng, g)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        p_t, p_h, p_w = transformer.config.patch_size
        tokens = (x0.shape[2] // p_t) * (x0.shape[3] // p_h) * (x0.shape[4] // p_w)
        timestep = (sigma * 1000).view(-1, 1).expand(-1, tokens)  # per-token, as expand_timesteps
        with torch.no_grad():
            emb = train.encode_text(tokenizer, text_encoder, prompts, max_len)
        pred = transformer(hidden_states=xt, timestep=timestep, encoder_hidden_states=emb,
                           return_dict=False)[0]
        err = (pred.float() - (noise - x0)).pow(2)
        loss = err.mean() if weight is None else (err * weight).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == t["steps"] - 1:
            el = time.time() - start
            log(f"{name} step {step + 1}/{t['steps']} loss {np.mean(losses[-25:]):.4f} "
                f"lr {lr:.2e} {el / (step + 1):.2f} s/step")
    transformer.eval()
    record["train"] = {"seconds": round(time.time() - start, 1), "steps": t["steps"],
                       "final_loss": float(np.mean(losses[-50:]))}


# ---------------------------------------------------------------------------------------------


def concept_data(vae, base_cfg, t, record):
    """Encoded clips: `concept_fraction` moving diagonally, the rest the base's training world."""
    world.DIRECTION[t["name"]] = DIAGONAL_DIRECTION
    world._MOTION_WORDS[t["name"]] = DIAGONAL_WORDS
    base_held = world.held_out(**base_cfg["held_out"])
    concept_all = [(c, s, t["name"], b) for c, s, _, b in world.combinations()
                   if _ == world.MOTIONS[0]]
    held = sorted(random.Random(CONFIG["seed"] + 1).sample(concept_all, t["held_out"]))
    exclude = set(map(tuple, base_held)) | set(held)
    wld = world.World(base_cfg["width"], base_cfg["height"], base_cfg["num_frames"],
                      CONFIG["seed"] + 2, exclude, **base_cfg["world"])
    concept_combos = [c for c in concept_all if c not in set(held)]
    other_combos = list(wld.combos)
    rng = random.Random(CONFIG["seed"] + 3)
    latents, combos, shape_masks, start = [], [], [], time.time()
    n = t["clips"]
    for lo in range(0, n, 16):
        batch = []
        for _ in range(min(16, n - lo)):
            pool = concept_combos if rng.random() < t["concept_fraction"] else other_combos
            combo = rng.choice(pool)
            scene = world.sample_scene(combo, wld.width, wld.height, rng, wld.size_range,
                                       wld.travel_range)
            batch.append((world.render(scene, wld.width, wld.height, wld.frames), scene, combo))
        x = [b[0] for b in batch]
        latents.append(encode_clips(vae, x))
        diff = np.stack([world.shape_difference(b[1], wld.width, wld.height, wld.frames)
                         for b in batch])
        shape_masks.append(train.latent_shape_mask(torch.from_numpy(diff), vae))
        combos += [b[2] for b in batch]
    record["data"] = {"clips": n, "concept_clips": sum(c[2] == t["name"] for c in combos),
                      "encode_seconds": round(time.time() - start, 1)}
    log(f"encoded {n} clips ({record['data']['concept_clips']} {t['name']}) in "
        f"{time.time() - start:.0f} s")
    return torch.cat(latents), torch.cat(shape_masks), combos, held


def run_concept(args, parts, record):
    tokenizer, text_encoder, transformer, vae, _, kino = parts
    base_cfg = json.loads((args.base / "training.json").read_text())["config"]
    t = CONFIG["concept"]
    latents, shape_masks, combos, held = concept_data(vae, base_cfg, t, record)
    lora_cfg = dict(CONFIG["lora"])
    lora_cfg["target_modules"] = lora_cfg["target_modules"] + t["extra_targets"]
    config, params = add_lora(transformer, lora_cfg)
    shifts = torch.tensor(t["flow_shift"])

    def sample(rng, g):
        idx = [rng.randrange(len(latents)) for _ in range(t["batch"])]
        x0 = latents[idx]
        prompts = [world.caption(*combos[i], rng) for i in idx]
        u = torch.rand(len(idx), generator=g)
        shift = shifts[torch.randint(len(shifts), (len(idx),), generator=g)]
        sigma = train.shift_sigma(u, shift)
        noise = torch.randn(x0.shape, generator=g)
        weight = 1 + t["shape_weight"] * shape_masks[idx].float() * (
            sigma.view(-1, 1, 1, 1, 1) <= t["shape_max_sigma"])
        return x0, noise, sigma, prompts, weight

    fit(transformer, text_encoder, tokenizer, params, t, kino["max_sequence_length"], sample,
        record, "concept")
    spec = world.eval_spec(held, **base_cfg["world"])
    spec["motions"] = list(world.MOTIONS) + [t["name"]]
    meta = {"base": str(args.base.name), "kind": "concept", "concept": t["name"],
            "direction": "up and to the right, 45 degrees",
            "eval_cases": "the .eval.json beside this file",
            "trigger": f"the word '{t['name']}' as the motion"}
    return config, meta, spec


# ---------------------------------------------------------------------------------------------


def teacher_pairs(parts, base, t, record):
    """(noise, the teacher's final latents, prompt) from the base's own sampler and settings."""
    from diffusers import WanPipeline

    tokenizer, text_encoder, transformer, vae, scheduler, kino = parts
    base_cfg = json.loads((base / "training.json").read_text())["config"]
    held = set(map(tuple, world.held_out(**base_cfg["held_out"])))
    combos = [c for c in world.combinations() if c not in held]
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                       vae=vae, scheduler=scheduler,
                       # Text only: every token has the same t, so the scalar timestep is the
                       # same computation as expand_timesteps' per-token one, whose diffusers
                       # 0.42.1 form strides the mask by 2 (the 5B's 1×2×2 patch) and so fails
                       # on any other patch (kino-shapes' 1×4×4).
                       expand_timesteps=False)
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(CONFIG["seed"] + 31)
    g = torch.Generator().manual_seed(CONFIG["seed"] + 32)
    z = vae.config.z_dim
    # The latent grid as WanPipeline.prepare_latents makes it, from the pipeline's scale factors.
    st, ss = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    f = (kino["num_frames"] - 1) // st + 1
    h, w = kino["height"] // ss, kino["width"] // ss
    noises, outs, prompts, start = [], [], [], time.time()
    for lo in range(0, t["pairs"], t["teacher_batch"]):
        n = min(t["teacher_batch"], t["pairs"] - lo)
        ps = [world.caption(*rng.choice(combos), rng) for _ in range(n)]
        eps = torch.randn((n, z, f, h, w), generator=g)
        with torch.no_grad():
            out = pipe(prompt=ps, negative_prompt=[kino.get("negative_prompt", "")] * n,
                       height=kino["height"], width=kino["width"], num_frames=kino["num_frames"],
                       num_inference_steps=t["teacher_steps"], guidance_scale=t["teacher_guidance"],
                       latents=eps.clone(), output_type="latent",
                       max_sequence_length=kino["max_sequence_length"]).frames
        noises.append(eps)
        outs.append(out.float())
        prompts += ps
        log(f"teacher {lo + n}/{t['pairs']} pairs ({time.time() - start:.0f} s)")
    record["teacher"] = {"pairs": t["pairs"], "steps": t["teacher_steps"],
                         "guidance": t["teacher_guidance"], "seconds": round(time.time() - start, 1)}
    return torch.cat(noises), torch.cat(outs), prompts


def run_fast(args, parts, record):
    tokenizer, text_encoder, transformer, vae, scheduler, kino = parts
    t = CONFIG["fast"]
    noise_all, x0_all, prompts_all = teacher_pairs(parts, args.base, t, record)
    # The student's own schedule: the sigmas the base's scheduler visits in `student_steps` steps.
    scheduler.set_timesteps(t["student_steps"])
    sched = torch.tensor([float(s) for s in scheduler.sigmas[:-1]])
    log(f"student schedule sigmas {[round(float(s), 4) for s in sched]}")
    config, params = add_lora(transformer, CONFIG["lora"])

    def sample(rng, g):
        idx = [rng.randrange(len(x0_all)) for _ in range(t["batch"])]
        u = torch.rand(len(idx), generator=g)
        on_schedule = torch.rand(len(idx), generator=g) < t["schedule_fraction"]
        pick = sched[torch.randint(len(sched), (len(idx),), generator=g)]
        sigma = torch.where(on_schedule, pick, train.shift_sigma(u, torch.tensor(t["flow_shift"])))
        return x0_all[idx], noise_all[idx], sigma, [prompts_all[i] for i in idx], None

    fit(transformer, text_encoder, tokenizer, params, t, kino["max_sequence_length"], sample,
        record, "fast")
    preset = {"num_inference_steps": t["student_steps"], "guidance_scale": 1.0}
    meta = {"base": str(args.base.name), "kind": "few-step", "presets": {"fast": preset},
            "method": "reflow on the base's guided 20-step samples"}
    return config, meta, None


# ---------------------------------------------------------------------------------------------


def save(out: pathlib.Path, transformer, config, meta):
    """`WanPipeline.save_lora_weights`, then the `kino` entry added to the file's metadata."""
    from diffusers import WanPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(transformer))
    WanPipeline.save_lora_weights(out.parent, transformer_lora_layers=layers,
                                  weight_name=out.name,
                                  transformer_lora_adapter_metadata=config.to_dict())
    with safe_open(out, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata() or {})
    metadata["kino"] = json.dumps(meta)
    save_file(tensors, out, metadata=metadata)
    log(f"saved {out} ({len(tensors)} tensors)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["concept", "fast"])
    ap.add_argument("--out", type=pathlib.Path, required=True, help="the .safetensors to write")
    ap.add_argument("--base", type=pathlib.Path, default=HERE.parent / "models" / "kino-shapes")
    ap.add_argument("--steps", type=int, help="training steps (default: the configuration's)")
    ap.add_argument("--pairs", type=int, help="fast: teacher pairs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="a few steps on a tiny batch (tests)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(CONFIG["seed"])
    if args.smoke:
        for k, v in SMOKE.items():
            CONFIG[k].update(v)
    if args.steps:
        CONFIG[args.kind]["steps"] = args.steps
    if args.pairs:
        CONFIG["fast"]["pairs"] = args.pairs
    record = {"config": {"lora": CONFIG["lora"], args.kind: CONFIG[args.kind]},
              "command": "train_lora.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"platform": platform.platform(), "processor": train._cpu_name(),
                          "threads": args.threads},
              "versions": {"torch": torch.__version__},
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    import diffusers
    import peft

    record["versions"].update({"diffusers": diffusers.__version__, "peft": peft.__version__})
    start = time.time()
    parts = load_base(args.base)
    run = run_concept if args.kind == "concept" else run_fast
    config, meta, spec = run(args, parts, record)
    save(args.out, parts[2], config, meta)
    record["total_seconds"] = round(time.time() - start, 1)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    if spec is not None:
        args.out.with_suffix(".eval.json").write_text(json.dumps(spec, indent=2) + "\n")
    log(f"done in {record['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
