"""Train kino-shapes: Kino's own small text-to-video model, in the Wan architecture.

    python training/train.py --out models/kino-shapes            # the shipped model (CPU, ~1–2 h)
    python training/train.py --out /tmp/s --smoke                 # a few steps, to check the script
    python training/train.py --out /tmp/v --stage vae-finetune --vae-from models/kino-shapes/vae \
        --device cuda --finetune-max-minutes 3                    # the VAE trained further (GPU)

Every part is a stock diffusers / transformers class at a small config, so the result is a normal
diffusers `WanPipeline` folder that Kino (and diffusers) load like any Wan checkpoint:

1. a word-level tokenizer over the grammar of `world.py` (tokenizers `WordLevel`, `</s>` appended);
2. `AutoencoderKLWan` trained alone on clips from the world (L1 + MSE + a small KL term);
   afterwards the per-channel latent mean and std are measured and written to its config, exactly
   where the Wan VAE keeps its `latents_mean` / `latents_std`;
3. `WanTransformer3DModel` and `UMT5EncoderModel` trained together with the rectified-flow
   objective Wan uses (x_t = (1 − σ)·x0 + σ·ε, target ε − x0, timestep 1000·σ, σ uniform then
   shifted, half the clips strongly towards pure noise), the loss weighted towards the cells
   that tell the shapes apart, 10% empty captions for classifier-free guidance, EMA weights;
   some clips (`dit_train.image_cond`) keep latent frame 0 clean at timestep 0 and leave it out
   of the loss: first-frame conditioning as Wan2.2 TI2V does it (`expand_timesteps` in
   model_index.json; diffusers' `WanImageToVideoPipeline` then takes an image).

Data are rendered on the fly from seeded scenes (`world.World`); the combinations in
`world.held_out()` never reach training. Everything is seeded; the configuration, the machine,
the times and the losses are written to `training.json` next to the weights, and the held-out
prompts with the palette to `kino-eval.json` (what `kino eval` reads).
"""

from __future__ import annotations

import argparse
import copy
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
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import world  # noqa: E402

CONFIG = {
    "seed": 0,
    "width": 64,
    "height": 64,
    "num_frames": 17,
    "fps": 8,
    "max_sequence_length": 32,
    "held_out": {"count": 24, "seed": 1234},
    # Object size and travel over the clip, pixels at 64×64 (see world.SIZE_RANGE).
    "world": {"size_range": list(world.SIZE_RANGE), "travel_range": list(world.TRAVEL_RANGE)},
    "vae": {
        "base_dim": 16,
        "z_dim": 16,
        "dim_mult": [1, 2, 4],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [True, True],
        "dropout": 0.0,
    },
    # The VAE trains in phases: whole frames, then windows around the object (most pixels near
    # the object, and cheap), first five frames long (one causal chunk after the first frame),
    # then nine and seventeen (the causal caches of every later chunk see what they see at 17
    # frames; a phase that stops short leaves the later latent frames untrained).
    "vae_train": {"object_weight": 20.0, "kl_weight": 1e-6, "stats_clips": 64, "phases": [
        {"name": "frames", "steps": 1000, "batch": 2, "frames": 9, "crop": None, "lr": 8e-4},
        {"name": "crops-5", "steps": 1500, "batch": 8, "frames": 5, "crop": 32, "lr": 1e-3},
        {"name": "crops-9", "steps": 500, "batch": 6, "frames": 9, "crop": 40, "lr": 5e-4},
        {"name": "crops-17", "steps": 300, "batch": 4, "frames": 17, "crop": 40, "lr": 3e-4},
    ]},
    # vae_decoder: `--stage vae-decoder` fine-tunes the decoder (and post_quant_conv) of a
    # finished VAE with its encoder frozen, so the latent space, its statistics and every
    # transformer trained on it stay valid. The joint training left outlines soft (a drawn
    # square's round trip read fill 0.94 against 1.00, and a long video re-encodes its own
    # decoded frames, compounding it). latent_noise: the decoder also sees latents with
    # Gaussian noise of std uniform in [0, latent_noise] latent stds, as a sampler's latents
    # are never exactly an encoder's. Same loss as the VAE phases.
    "vae_decoder_train": {"object_weight": 20.0, "latent_noise": 0.1, "shape_weight": 0.0,
                          "phases": [
        {"name": "decoder-crops-5", "steps": 1200, "batch": 8, "frames": 5, "crop": 32, "lr": 5e-4},
        {"name": "decoder-crops-17", "steps": 300, "batch": 4, "frames": 17, "crop": 40, "lr": 2e-4},
    ]},
    # vae_finetune: `--stage vae-finetune` trains a finished VAE further, encoder and decoder,
    # on whole 17-frame clips drawn in batches on the device (a GPU's job), the pixels that
    # tell the shapes apart weighted 1 + shape_weight: the VAE of the joint training loses a
    # square's corners in the latent itself (round trip fill 0.946, min 0.924, against 0.997
    # drawn; a decoder-only fine-tune kept 0.942), so the encoder has to change too. The
    # latent statistics are measured again; a transformer must then be trained on its latents.
    "vae_finetune_train": {"object_weight": 20.0, "shape_weight": 8.0, "kl_weight": 1e-6,
                           "stats_clips": 256, "phases": [
        {"name": "finetune-17", "steps": 600, "batch": 32, "frames": 17, "crop": None, "lr": 2e-4},
    ]},
    "text_encoder": {"d_model": 128, "d_kv": 32, "d_ff": 256, "num_layers": 2, "num_heads": 4,
                     "relative_attention_num_buckets": 32, "relative_attention_max_distance": 64},
    "transformer": {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "ffn_dim": 512,
        "num_layers": 4,
        "freq_dim": 128,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    },
    # object_weight: the flow-matching loss on latent cells the object touches (and their
    # neighbours) counts 1 + object_weight times, so the plain backgrounds, most of every clip,
    # don't drown out what the prompt is about. It learnt colour faster, but it also biases the
    # model towards objects too large and soft, so it is off (the shipped model's last runs).
    # shape_weight: the loss on latent cells where the three shapes would differ (the corners
    # of a square, the flanks of a triangle: world.shape_difference) counts 1 + shape_weight
    # times, at noise levels up to shape_max_sigma only. Those cells are a few percent of a clip,
    # and the model had learnt to ignore the shape words at noise levels <= 0.7 (the caption
    # changed nothing in its one-step predictions there) and to round every outline. Only
    # where the object's position is already settled, so that the weight can't inflate it.
    # Weight 8 took held-out shape from 60% to 76% in 3,500 steps and 83% in 3,000 more.
    # bf16: autocast the forward passes (CPUs with AVX-512 BF16 and GPUs; master weights f32).
    # flow_shift: training noise levels are shift_sigma(uniform, shift), with the shift drawn per
    # clip from this list. A high shift puts steps near pure noise, the only levels where the
    # prompt alone decides which way the object goes: 16 latent channels show a faint object
    # already at noise level 0.95, and a model trained with shift 2 learnt to copy motion from
    # the noisy clip but never from the words (motion 18%; shift 10 took it to 81% in 2,000
    # steps). A low shift keeps the levels that shape the object's outline trained.
    # image_cond: the fraction of clips trained as image-to-video the way Wan2.2 TI2V runs
    # (diffusers' WanImageToVideoPipeline with expand_timesteps): latent frame 0 is the clean
    # latent of pixel frame 0 (the causal VAE's first latent frame depends on frame 0 alone, so
    # it is what encoding the given image alone gives), its tokens get timestep 0 and the other
    # tokens the clip's timestep (per-token timesteps [B, S]), and frame 0 is left out of the
    # loss (the pipeline overwrites it with the image at every step). The other clips train
    # text-to-video as before (every token at the clip's timestep).
    # cond_roundtrip, cond_blur, cond_noise: a long video continues from the last frame made so
    # far, which reaches the model decoded, rounded to 8 bits and encoded again, a little
    # blurred and off its palette; copying that faithfully compounds the errors segment after
    # segment (colours drift, squares round off). This fraction of the image-conditioned clips
    # get as condition the VAE round trip of their frame 0 (decoded, 8-bit, blurred with a
    # Gaussian of sigma uniform in [0, cond_blur] px, encoded alone) plus Gaussian noise of std
    # uniform in [0, cond_noise] on the normalised latent, while the frames to predict stay the
    # clean clip's: the model learns to continue a degraded first frame as the world draws it.
    "dit_train": {"steps": 2500, "batch": 32, "lr": 5e-4, "lr_floor": 0.05, "warmup": 100,
                  "clips": 4000, "flow_shift": [10.0, 2.0],
                  "caption_dropout": 0.1, "ema": 0.998, "encode_batch": 16, "object_weight": 0.0,
                  "shape_weight": 8.0, "shape_max_sigma": 0.8, "image_cond": 0.5, "bf16": True,
                  "cond_roundtrip": 0.0, "cond_blur": 0.0, "cond_noise": 0.0},
    # inference: the sampler settings written to kino.json. Guidance 2 (3 until the weights of
    # run r20 were measured with both: held-out text and image cases the same, long videos'
    # seams closer and their squares kept a little more often; see the README's kino-shapes
    # section).
    "inference": {"num_inference_steps": 20, "guidance_scale": 2.0, "flow_shift": 5.0},
}

SMOKE = {"vae_finetune_train": {"stats_clips": 2, "phases": [
             {"name": "finetune-17", "steps": 2, "batch": 2, "frames": 17, "crop": None, "lr": 2e-4}]},
         "vae_decoder_train": {"phases": [
             {"name": "decoder-crops-5", "steps": 2, "batch": 1, "frames": 5, "crop": 32, "lr": 5e-4}]},
         "vae_train": {"stats_clips": 2, "phases": [
             {"name": "frames", "steps": 2, "batch": 1, "frames": 5, "crop": None, "lr": 8e-4},
             {"name": "crops-9", "steps": 2, "batch": 1, "frames": 9, "crop": 40, "lr": 5e-4}]},
         "dit_train": {"steps": 2, "batch": 2, "clips": 2, "warmup": 1, "encode_batch": 2,
                       "cond_roundtrip": 0.5, "cond_blur": 1.0, "cond_noise": 0.1}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def warmup_cosine(peak: float, step: int, warmup: int, frac: float, floor: float = 0.05) -> float:
    """The learning rate of every training loop here: a linear warmup over `warmup` steps, then a
    cosine from `peak` down to `floor` × `peak` as `frac` (the share of the run done) goes 0 → 1."""
    return peak * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


DEVICE = torch.device("cpu")


def to_tensor(clips: list[np.ndarray]) -> torch.Tensor:
    """uint8 [F, H, W, 3] clips → [B, 3, F, H, W] in [-1, 1], as WanPipeline's video processor."""
    x = torch.from_numpy(np.stack(clips)).float() / 127.5 - 1.0
    return x.permute(0, 4, 1, 2, 3).contiguous().to(DEVICE)


# ---------------------------------------------------------------------------------------------
# Tokenizer and text encoder


def build_tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + world.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=max_length,
    )


def encode_text(tokenizer, text_encoder, prompts: list[str], max_length: int) -> torch.Tensor:
    """WanPipeline._get_t5_prompt_embeds: embeddings cut at each prompt's length, zero-padded."""
    t = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                  add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = t.attention_mask
    dev = next(text_encoder.parameters()).device
    mask = mask.to(dev)
    emb = text_encoder(t.input_ids.to(dev), mask).last_hidden_state
    seq_lens = mask.gt(0).sum(dim=1)
    keep = torch.arange(max_length, device=dev)[None, :] < seq_lens[:, None]
    return emb * keep.unsqueeze(-1).to(emb.dtype)


# ---------------------------------------------------------------------------------------------
# Stage 1: VAE


def encode_mean(vae, x: torch.Tensor) -> torch.Tensor:
    """The posterior mean of `AutoencoderKLWan._encode` (which clears its feature cache itself)."""
    return vae._encode(x).chunk(2, dim=1)[0]


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLWan._decode` without its final clamp to [-1, 1] (a clamp passes no gradient,
    and a decoder that overshoots would stop learning)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map,
                                  feat_idx=vae._conv_idx, first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, 2)


def object_pixels(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] 1 where clips `x` [B, 3, F, H, W] differ from their first frame's corner
    pixel: the object (the background is plain, and objects never reach a frame's corners)."""
    return ((x - x[:, :, :1, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.02).float()


def decoder_parameters(vae) -> list:
    """What stage vae-decoder trains: the decoder and post_quant_conv (the encoder side, so the
    latents, stays as it is)."""
    return list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())


def vae_phase(vae, name, steps, lr_max, sample, batch, object_weight, kl_weight, record,
              decoder_only=False, latent_noise=0.0, key="vae", shape_weight=0.0, batched=False,
              max_seconds=None):
    """One VAE training phase. decoder_only: the encoder stays frozen (stage vae-decoder) and the
    latents get Gaussian noise of std uniform in [0, latent_noise] latent stds. `sample()` gives
    a clip, or (clip, its world.shape_difference) whose pixels then weigh shape_weight more;
    with `batched`, `sample(n)` gives n clips (and differences) as tensors on DEVICE."""
    params = decoder_parameters(vae) if decoder_only else list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=lr_max, weight_decay=0.0)
    std = torch.tensor(vae.config.latents_std, device=DEVICE).view(1, -1, 1, 1, 1)
    losses, start = [], time.time()
    vae.train()
    for step in range(steps):
        frac = step / steps
        if max_seconds:  # the schedule runs on the clock too, and stops when the time is spent
            if time.time() - start >= max_seconds:
                log(f"{name}: time budget of {max_seconds:.0f} s spent at step {step}")
                steps = step
                break
            frac = max(frac, (time.time() - start) / max_seconds)
        lr = warmup_cosine(lr_max, step, 50, frac, floor=0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        extra = None
        if batched:  # sample(n) renders n whole clips at once on DEVICE (World.sample_batch)
            drawn = sample(batch)
            if isinstance(drawn, tuple):
                drawn, diff = drawn
                extra = diff[:, None]
            x = drawn.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        else:
            drawn = [sample() for _ in range(batch)]
            if isinstance(drawn[0], tuple):  # (clip, shape_difference): pixels weighted by shape_weight
                drawn, diff = zip(*drawn)
                extra = torch.from_numpy(np.stack(diff))[:, None].to(DEVICE)
            x = to_tensor(list(drawn))
        # The posterior's mean only (what encoding for the transformer uses): sampling with the
        # initial unit variance buries the encoder's small initial signal in noise, and with the
        # tiny KL weight Wan uses the VAE then takes far longer to learn the object.
        if decoder_only:
            with torch.no_grad():
                mu = encode_mean(vae, x)
                if latent_noise > 0:
                    level = torch.rand(mu.shape[0], 1, 1, 1, 1, device=DEVICE) * latent_noise
                    mu = mu + torch.randn_like(mu) * level * std
        else:
            mu = encode_mean(vae, x)
        rec = decode_unclamped(vae, mu)
        # The object covers ~5% of a frame; without extra weight the VAE learns the background
        # and blurs the object away. (A window may cut the object from the corner pixel
        # `object_pixels` compares with, but then the weight merely drops to 1 there.)
        obj = object_pixels(x)
        w = 1.0 + object_weight * obj
        if extra is not None:
            w = w + shape_weight * extra
        d = rec - x
        rec_loss = ((d.abs() + d.pow(2)) * w).mean() / w.mean()
        obj_err = (d.abs() * obj).sum() / (obj.sum() * 3 + 1)
        kl = 0.5 * mu.pow(2).mean()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(rec_loss.item())
        if step % 25 == 0 or step == steps - 1:
            el = time.time() - start
            log(f"{name} step {step + 1}/{steps} rec {np.mean(losses[-25:]):.4f} object L1 "
                f"{obj_err.item():.3f} lr {lr:.2e} {el / (step + 1):.2f} s/step")
    record[key]["phases"].append({"phase": name, "steps": steps, "seconds": round(time.time() - start, 1),
                                  "final_reconstruction_loss": float(np.mean(losses[-50:]))})
    record[key]["final_reconstruction_loss"] = float(np.mean(losses[-50:]))


def new_vae(cfg, rng_seed: int):
    """An untrained VAE of cfg["vae"]'s architecture on DEVICE (latent statistics 0 / 1 until
    measured)."""
    from diffusers import AutoencoderKLWan

    c = cfg["vae"]
    spatial = 2 ** (len(c["dim_mult"]) - 1)
    temporal = 2 ** sum(c["temperal_downsample"])
    torch.manual_seed(rng_seed)
    vae = AutoencoderKLWan(
        **c,
        latents_mean=[0.0] * c["z_dim"],
        latents_std=[1.0] * c["z_dim"],
        scale_factor_spatial=spatial,
        scale_factor_temporal=temporal,
    )
    vae.to(DEVICE)
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"VAE: {n_params / 1e6:.2f} M parameters, {spatial}x spatial, {temporal}x temporal")
    return vae


def train_vae(cfg, rng_seed: int, exclude, record, resume=None):
    t = cfg["vae_train"]
    vae = new_vae(cfg, rng_seed)
    record["vae"] = {"parameters": sum(p.numel() for p in vae.parameters()), "phases": []}
    if resume is not None:
        vae.load_state_dict(resume[0].state_dict())
    for i, ph in enumerate(t["phases"]):
        if resume is not None and i < resume[1]:
            record["vae"]["phases"].append({"phase": ph["name"], "resumed_from": str(resume[2])})
            continue
        if ph["crop"] is None:
            wld = world.World(cfg["width"], cfg["height"], ph["frames"], rng_seed + 1 + 3 * i, exclude,
                              **cfg["world"])
            sample = lambda wld=wld: wld.sample()[0]  # noqa: E731
        else:
            wld = world.World(cfg["width"], cfg["height"], cfg["num_frames"], rng_seed + 1 + 3 * i,
                              exclude, **cfg["world"])
            sample = lambda wld=wld, ph=ph: wld.sample_crop(ph["frames"], ph["crop"])  # noqa: E731
        vae_phase(vae, ph["name"], ph["steps"], ph["lr"], sample, ph["batch"], t["object_weight"],
                  t["kl_weight"], record)

    return measure_latents(vae, cfg, rng_seed, exclude, record, t["stats_clips"])


def measure_latents(vae, cfg, rng_seed: int, exclude, record, stats_clips: int, key="vae"):
    """Latent statistics over full-length clips (what the transformer will see), written to the
    VAE's config as `latents_mean` / `latents_std`, and the round trip's PSNR to the record."""
    vae.eval()
    wld = world.World(cfg["width"], cfg["height"], cfg["num_frames"], rng_seed + 3, exclude,
                      **cfg["world"])
    mus = []
    with torch.no_grad():
        for _ in range(max(1, stats_clips // 8)):
            x = to_tensor([wld.sample()[0] for _ in range(min(8, stats_clips))])
            mus.append(encode_mean(vae, x))
        mu = torch.cat(mus)
        mean = mu.mean(dim=(0, 2, 3, 4))
        std = mu.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    psnr = reconstruction_psnr(vae, [wld.sample()[0] for _ in range(4)])
    vae.register_to_config(latents_mean=[round(float(v), 6) for v in mean],
                           latents_std=[round(float(v), 6) for v in std])
    record[key]["reconstruction_psnr_db_17_frames"] = round(psnr, 2)
    log(f"VAE done: PSNR {psnr:.2f} dB on 17-frame clips; latent std {std.mean():.3f}")
    return vae


def reconstruction_psnr(vae, clips) -> float:
    """PSNR (dB, pixels in [-1, 1]) of the VAE's round trip of `clips`, 4 at a time."""
    vae.eval()
    err = 0.0
    with torch.no_grad():
        for i in range(0, len(clips), 4):
            x = to_tensor(clips[i : i + 4])
            err += F.mse_loss(vae.decode(encode_mean(vae, x)).sample, x, reduction="sum").item()
    return 10 * math.log10(4.0 / (err / (len(clips) * clips[0].size)))


def train_vae_decoder(cfg, vae, rng_seed: int, exclude, record):
    """Stage vae-decoder (see CONFIG["vae_decoder_train"]): the decoder of a finished VAE
    fine-tuned, the encoder (so the latents and their statistics) unchanged."""
    t = cfg["vae_decoder_train"]
    held = world.World(cfg["width"], cfg["height"], cfg["num_frames"], rng_seed + 17, exclude,
                       **cfg["world"])
    clips = [held.sample()[0] for _ in range(8 if t["phases"][0]["steps"] < 10 else 32)]
    before = reconstruction_psnr(vae, clips)
    log(f"VAE decoder: PSNR before {before:.2f} dB on {len(clips)} 17-frame clips")
    record["vae_decoder"] = {"phases": [], "latent_noise": t["latent_noise"],
                             "psnr_db_before": round(before, 2)}
    for i, ph in enumerate(t["phases"]):
        wld = world.World(cfg["width"], cfg["height"], cfg["num_frames"], rng_seed + 40 + 3 * i,
                          exclude, **cfg["world"])
        sw = t.get("shape_weight", 0.0)
        sample = lambda wld=wld, ph=ph: wld.sample_crop(ph["frames"], ph["crop"], sw > 0)  # noqa: E731
        vae_phase(vae, ph["name"], ph["steps"], ph["lr"], sample, ph["batch"], t["object_weight"],
                  0.0, record, decoder_only=True, latent_noise=t["latent_noise"], key="vae_decoder",
                  shape_weight=sw)
    after = reconstruction_psnr(vae, clips)
    record["vae_decoder"]["psnr_db_after"] = round(after, 2)
    log(f"VAE decoder done: PSNR {before:.2f} -> {after:.2f} dB")
    return vae


def train_vae_finetune(cfg, vae, rng_seed: int, exclude, record):
    """Stage vae-finetune (see CONFIG["vae_finetune_train"]): a finished VAE trained further,
    encoder and decoder, on whole clips rendered in batches on DEVICE; then its latent
    statistics are measured again."""
    t = cfg["vae_finetune_train"]
    held = world.World(cfg["width"], cfg["height"], cfg["num_frames"], rng_seed + 17, exclude,
                       **cfg["world"])
    clips = [held.sample()[0] for _ in range(8 if t["phases"][0]["steps"] < 10 else 32)]
    record["vae_finetune"] = {"phases": [], "shape_weight": t["shape_weight"],
                              "psnr_db_before": round(reconstruction_psnr(vae, clips), 2),
                              "square_fill_before": square_fill(vae, cfg, rng_seed)}
    log(f"VAE fine-tune: before {record['vae_finetune']}")
    for i, ph in enumerate(t["phases"]):
        wld = world.World(cfg["width"], cfg["height"], cfg["num_frames"], rng_seed + 60 + 3 * i,
                          exclude, **cfg["world"])
        sample = lambda n, wld=wld: wld.sample_batch(n, DEVICE, True)  # noqa: E731
        vae_phase(vae, ph["name"], ph["steps"], ph["lr"], sample, ph["batch"], t["object_weight"],
                  t["kl_weight"], record, key="vae_finetune", shape_weight=t["shape_weight"],
                  batched=True, max_seconds=t.get("max_seconds"))
    vae = measure_latents(vae, cfg, rng_seed, exclude, record, t["stats_clips"], "vae_finetune")
    rec = record["vae_finetune"]
    rec["psnr_db_after"] = round(reconstruction_psnr(vae, clips), 2)
    rec["square_fill_after"] = square_fill(vae, cfg, rng_seed)
    log(f"VAE fine-tune done: PSNR {rec['psnr_db_before']} -> {rec['psnr_db_after']} dB, square "
        f"fill {rec['square_fill_before']} -> {rec['square_fill_after']}")
    return vae


def soft_fill(clip: np.ndarray) -> float:
    """What `kino eval`'s analyser calls fill, for a clip [F, H, W, 3] (the median over its
    frames): the background is the median colour of a 2-pixel border, the object's colour the
    median of its inner half (pixels over half the 99th percentile distance, the farther half of
    them), a pixel's coverage (distance - border noise) / (contrast - border noise) clamped to
    [0, 1], and fill = coverage summed / (widest row sum x tallest column sum)."""
    x = clip.astype(np.float32)
    f, h, w, _ = x.shape
    border = np.ones((h, w), bool)
    border[2:-2, 2:-2] = False
    bg = np.median(x[:, border].reshape(-1, 3), axis=0)
    d = np.linalg.norm(x - bg, axis=-1)
    inner = []
    for df, xf in zip(d, x):
        px = df > max(0.5 * np.percentile(df, 99), 40.0)
        if px.sum() > 0:
            inner.append(xf[px & (df >= np.median(df[px]))])
    if not inner:
        return 0.0
    contrast = float(np.linalg.norm(np.median(np.concatenate(inner), axis=0) - bg))
    floor = min(float(np.median(d[:, border])), 0.5 * max(0.5 * contrast, 20.0))
    cov = np.clip((d - floor) / max(contrast - floor, 1.0), 0, 1)
    rows, cols = cov.sum(axis=2).max(axis=1), cov.sum(axis=1).max(axis=1)
    return float(np.median(cov.sum(axis=(1, 2)) / np.maximum(rows * cols, 1e-9)))


def square_clips(cfg, seed: int, n: int) -> list[np.ndarray]:
    """`n` clips of a square drawn by the world (the ones `square_fill` measures)."""
    rng = random.Random(seed + 99)
    combos = [c for c in world.combinations() if c[1] == "square"]
    scenes = [world.sample_scene(rng.choice(combos), cfg["width"], cfg["height"], rng,
                                 cfg["world"]["size_range"], cfg["world"]["travel_range"])
              for _ in range(n)]
    return [world.render(sc, cfg["width"], cfg["height"], cfg["num_frames"]) for sc in scenes]


def square_fill(vae, cfg, seed: int, n: int = 16) -> dict:
    """Squares drawn by the world and passed through the VAE (encode mean, decode, 8 bits):
    the median fill over each clip's frames, mean and least over `n` clips, drawn and after the
    round trip (`kino eval` reads a shape as a square from fill 0.91; a circle is 0.785)."""
    clips = square_clips(cfg, seed, n)
    vae.eval()
    drawn, after = [], []
    with torch.no_grad():
        for i in range(0, n, 8):
            x = to_tensor(clips[i : i + 8])
            y = vae.decode(encode_mean(vae, x)).sample.clamp(-1, 1)
            y = ((y + 1) * 127.5).round().permute(0, 2, 3, 4, 1).to(torch.uint8).cpu().numpy()
            for src, rt in zip(clips[i : i + 8], y):
                drawn.append(soft_fill(src))
                after.append(soft_fill(rt))
    return {"drawn": round(float(np.mean(drawn)), 3), "round_trip": round(float(np.mean(after)), 3),
            "round_trip_min": round(float(np.min(after)), 3)}


# ---------------------------------------------------------------------------------------------
# Stage 2: transformer + text encoder


def latent_cells(m: torch.Tensor, vae) -> torch.Tensor:
    """A pixel mask [B, 1, F, H, W] at the latent's resolution [B, 1, F', H', W']: each cell
    takes the largest value of its pixels. Latent frame 0 is pixel frame 0 and latent frame k
    the next `2**sum(temperal_downsample)` frames (the causal VAE's chunks); a cell covers
    `2**(len(dim_mult) - 1)` pixels a side."""
    t_scale = 2 ** sum(vae.config.temperal_downsample)
    s_scale = 2 ** (len(vae.config.dim_mult) - 1)
    b, _, f, h, w = m.shape
    rest = m[:, :, 1:].reshape(b, 1, (f - 1) // t_scale, t_scale, h, w).amax(dim=3)
    m = torch.cat([m[:, :, :1], rest], dim=2)
    return F.max_pool3d(m, (1, s_scale, s_scale))


def latent_object_mask(x: torch.Tensor, vae) -> torch.Tensor:
    """Which latent cells each clip's object touches: [B, 1, F', H', W'] in {0, 1}, from clips
    `x` [B, 3, F, H, W] (`object_pixels`). Dilated by one cell, as the encoder sees a little
    around the object."""
    m = latent_cells(object_pixels(x), vae)
    m = F.max_pool3d(m, (1, 3, 3), stride=1, padding=(0, 1, 1))
    return m.to(torch.uint8).cpu()


def latent_shape_mask(diff: torch.Tensor, vae) -> torch.Tensor:
    """Which latent cells tell the shapes apart in each scene: [B, 1, F', H', W'] in {0, 1},
    the cells where the three shapes drawn at the scene's size and positions differ by more
    than a tenth of a pixel's coverage (`diff` [B, F, H, W]: `world.shape_difference`)."""
    m = latent_cells(diff[:, None].float(), vae)
    return (m > 0.1).to(torch.uint8).cpu()


def check_first_frame_latent(cfg, vae, rng_seed: int, exclude) -> None:
    """The image-conditioned clips use latent frame 0 of the whole clip's encoding as the
    condition; WanImageToVideoPipeline encodes the image alone (one frame). With the causal VAE
    (frame 0 is its own first chunk, quant_conv is 1×1×1) the two are the same: check it."""
    wld = world.World(cfg["width"], cfg["height"], cfg["num_frames"], rng_seed + 14, exclude,
                      **cfg["world"])
    x = to_tensor([wld.sample()[0] for _ in range(2)])
    with torch.no_grad():
        whole = encode_mean(vae, x)[:, :, :1]
        alone = encode_mean(vae, x[:, :, :1])
    diff = (whole - alone).abs().max().item()
    log(f"latent frame 0: whole clip vs first frame alone, max difference {diff:.2e}")
    assert diff < 1e-4, diff


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blurs images [N, C, H, W] with a Gaussian of `sigma` px (reflecting edges)."""
    if sigma < 1e-3:
        return x
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def roundtrip_first_frames(vae, latents, mean, std, blur_max: float, seed: int,
                           batch: int = 64) -> torch.Tensor:
    """The condition a long video's later segments get, for each clip's frame 0: its normalised
    latent frame 0 decoded (diffusers' decode, clamped), rounded to 8 bits, blurred by a
    Gaussian of sigma uniform in [0, blur_max] px, and encoded alone. [N, C, 1, H', W']."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(latents), batch):
            z = latents[i : i + batch, :, :1].to(DEVICE) * std + mean
            x = vae.decode(z).sample[:, :, 0]
            x = torch.round((x + 1) * 127.5) / 127.5 - 1
            sig = torch.rand(len(x), generator=g) * blur_max
            x = torch.cat([gaussian_blur(x[j : j + 1], float(sig[j])) for j in range(len(x))])
            mu = encode_mean(vae, x[:, :, None])
            out.append(((mu - mean) / std).to(torch.float32).cpu())
    return torch.cat(out)


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def train_dit(cfg, vae, tokenizer, rng_seed: int, exclude, record, resume=None,
              checkpoint=None, latent_cache=None, init_from=None):
    """checkpoint: (every, fn) calls fn(step, ema transformer, ema text encoder) every `every`
    steps (to evaluate a long run while it goes on). latent_cache: a file that keeps the encoded
    training clips between runs with the same VAE (written if absent). init_from: an earlier
    model folder whose text encoder and transformer tensors of the same shape start this run
    (the rest, e.g. the patch embedding and output projection of another patch size, start
    fresh): a new VAE's transformer keeps what the old one learnt about words and motion."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    t = cfg["dit_train"]
    L = cfg["max_sequence_length"]
    z_dim = cfg["vae"]["z_dim"]
    torch.manual_seed(rng_seed + 10)
    te_cfg = UMT5Config(vocab_size=len(tokenizer), dropout_rate=0.0, feed_forward_proj="gated-gelu",
                        is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0, tie_word_embeddings=False, **cfg["text_encoder"])
    text_encoder = UMT5EncoderModel(te_cfg)
    transformer = WanTransformer3DModel(in_channels=z_dim, out_channels=z_dim,
                                        text_dim=cfg["text_encoder"]["d_model"], **cfg["transformer"])
    if resume is not None:
        # Continue from an earlier run's (EMA) weights: a second round with a fresh schedule.
        # (The safetensors directly: WanTransformer3DModel.from_pretrained wants `accelerate`.)
        from safetensors.torch import load_file

        text_encoder = UMT5EncoderModel.from_pretrained(resume / "text_encoder")
        transformer.load_state_dict(
            load_file(resume / "transformer" / "diffusion_pytorch_model.safetensors"))
        record["transformer_resumed_from"] = str(resume)
    elif init_from is not None:
        from safetensors.torch import load_file

        text_encoder = UMT5EncoderModel.from_pretrained(init_from / "text_encoder")
        old = load_file(init_from / "transformer" / "diffusion_pytorch_model.safetensors")
        own = transformer.state_dict()
        kept = {k: v for k, v in old.items() if k in own and own[k].shape == v.shape}
        # Another latent layout (patch size or channels) gives the patch embedding and the output
        # projection another meaning even where their shapes agree (the shipped 16 channels x 2x2
        # and a reduced 4 channels x 4x4 are both 64 numbers a token): those start fresh.
        old_cfg = json.loads((init_from / "transformer" / "config.json").read_text())
        if (list(old_cfg["patch_size"]) != list(cfg["transformer"]["patch_size"])
                or old_cfg["in_channels"] != z_dim or old_cfg["out_channels"] != z_dim):
            kept = {k: v for k, v in kept.items()
                    if not k.startswith(("patch_embedding.", "proj_out."))}
        fresh = sorted(k for k in own if k not in kept)
        transformer.load_state_dict(kept, strict=False)
        record["transformer_initialised_from"] = {"folder": str(init_from), "fresh": fresh}
        log(f"transformer from {init_from}: {len(kept)} tensors kept, fresh: {', '.join(fresh) or 'none'}")
    text_encoder.to(DEVICE)
    transformer.to(DEVICE)
    n_te = sum(p.numel() for p in text_encoder.parameters())
    n_tr = sum(p.numel() for p in transformer.parameters())
    log(f"text encoder {n_te / 1e6:.2f} M, transformer {n_tr / 1e6:.2f} M parameters")

    # The training clips: rendered and encoded once (posterior mean, normalised like the pipeline
    # un-normalises: z = (mu - mean) / std); captions are re-drawn from the grammar every time.
    mean = torch.tensor(vae.config.latents_mean, device=DEVICE).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=DEVICE).view(1, -1, 1, 1, 1)
    cache_key = {"vae": [float(v) for v in vae.config.latents_mean + vae.config.latents_std],
                 "clips": t["clips"], "seed": rng_seed, "size": [cfg["width"], cfg["height"],
                                                                cfg["num_frames"]],
                 "world": cfg["world"]}
    saved = torch.load(latent_cache) if latent_cache is not None and latent_cache.exists() else {}
    start = time.time()
    reuse = saved.get("key") == cache_key and "shape_masks" in saved
    if reuse:
        latents, masks, combos = [saved["latents"]], [saved["masks"]], saved["combos"]
        shape_masks = [saved["shape_masks"]]
        log(f"latents from {latent_cache}")
    else:
        wld = world.World(cfg["width"], cfg["height"], cfg["num_frames"], rng_seed + 11, exclude,
                          **cfg["world"])
        latents, combos, masks, shape_masks = [], [], [], []
        vae.eval()
        with torch.no_grad():
            done = 0
            while done < t["clips"]:
                n = min(t["encode_batch"], t["clips"] - done)
                batch = [wld.sample_with_scene(render=False) for _ in range(n)]
                clips, diff = world.render_batch([b[1] for b in batch], cfg["width"],
                                                 cfg["height"], cfg["num_frames"], DEVICE, True)
                x = clips.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
                mu = encode_mean(vae, x)
                latents.append(((mu - mean) / std).to(torch.float32).cpu())
                masks.append(latent_object_mask(x, vae))
                shape_masks.append(latent_shape_mask(diff, vae))
                combos += [b[3] for b in batch]
                done += n
                if done % 1000 < n:
                    log(f"encoded {done}/{t['clips']} clips ({time.time() - start:.0f} s)")
    latents, masks, shape_masks = torch.cat(latents), torch.cat(masks), torch.cat(shape_masks)
    if t["image_cond"] > 0:
        check_first_frame_latent(cfg, vae, rng_seed, exclude)
    if latent_cache is not None and not reuse:
        torch.save({"key": cache_key, "latents": latents, "masks": masks,
                    "shape_masks": shape_masks, "combos": combos}, latent_cache)
    assert masks.shape[2:] == latents.shape[2:], (masks.shape, latents.shape)
    assert shape_masks.shape == masks.shape, (shape_masks.shape, masks.shape)
    roundtrip = None
    if t["image_cond"] > 0 and t["cond_roundtrip"] > 0:
        rt_start = time.time()
        roundtrip = roundtrip_first_frames(vae, latents, mean, std, t["cond_blur"], rng_seed + 15)
        diff = (roundtrip - latents[:, :, :1]).pow(2).mean().sqrt().item()
        log(f"round-trip first frames in {time.time() - rt_start:.0f} s: RMS change {diff:.3f} "
            f"of the normalised latent (std {latents.std():.3f})")
    encode_seconds = time.time() - start
    log(f"latents {tuple(latents.shape)}, std {latents.std():.3f}, object cells "
        f"{masks.float().mean():.3f}, shape cells {shape_masks.float().mean():.3f}")

    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=t["lr"], weight_decay=0.01, betas=(0.9, 0.99))
    ema_tr, ema_te = copy.deepcopy(transformer).eval(), copy.deepcopy(text_encoder).eval()
    for p in list(ema_tr.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    rng = random.Random(rng_seed + 12)
    g = torch.Generator().manual_seed(rng_seed + 13)
    shifts = torch.tensor(t["flow_shift"])
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=t["bf16"])
    losses, plain, start = [], [], time.time()
    p_t, p_h, p_w = cfg["transformer"]["patch_size"]
    transformer.train()
    text_encoder.train()
    budget = t.get("max_seconds")  # --dit-max-minutes: the schedule runs on the clock too
    floor = t["lr_floor"]  # --dit-lr-floor: the cosine ends at this fraction of the peak
    steps_run = 0
    for step in range(t["steps"]):
        frac = step / max(t["steps"], 1)
        if budget:
            if time.time() - start >= budget:
                log(f"dit: time budget of {budget:.0f} s spent at step {step}")
                break
            frac = max(frac, (time.time() - start) / budget)
        lr = warmup_cosine(t["lr"], step, t["warmup"], frac, floor)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = [rng.randrange(len(latents)) for _ in range(t["batch"])]
        x0 = latents[idx].to(DEVICE)
        prompts = ["" if rng.random() < t["caption_dropout"] else world.caption(*combos[i], rng)
                   for i in idx]
        u = torch.rand(len(idx), generator=g).to(DEVICE)
        shift = shifts[torch.randint(len(shifts), (len(idx),), generator=g)].to(DEVICE)
        sigma = shift_sigma(u, shift)
        noise = torch.randn(x0.shape, generator=g).to(DEVICE)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        # First-frame conditioning (image_cond): `mask` is the pipeline's first_frame_mask, 0 on
        # latent frame 0 of the conditioned clips and 1 elsewhere. The model input is
        # WanImageToVideoPipeline's `(1 - mask) * condition + mask * latents` (condition = the
        # clean normalised latent), and the per-token timestep its
        # `(mask[:, 0, :, ::2, ::2] * t).flatten()` (the token grid of patch 1×2×2).
        cond = (torch.rand(len(idx), generator=g) < t["image_cond"]).to(DEVICE)
        mask = torch.ones_like(x0[:, :1])
        mask[:, :, 0] = (~cond).float().view(-1, 1, 1, 1)
        c0 = x0
        if roundtrip is not None:
            deg = (torch.rand(len(idx), generator=g) < t["cond_roundtrip"]).to(DEVICE)
            first = torch.where(deg.view(-1, 1, 1, 1, 1), roundtrip[idx].to(DEVICE), x0[:, :, :1])
            amp = torch.rand(len(idx), generator=g).to(DEVICE) * t["cond_noise"] * deg
            first = first + amp.view(-1, 1, 1, 1, 1) * torch.randn(first.shape, generator=g).to(DEVICE)
            c0 = torch.cat([first, x0[:, :, 1:]], dim=2)
        xt = (1 - mask) * c0 + mask * xt
        timestep = (mask[:, 0, ::p_t, ::p_h, ::p_w] * (sigma * 1000).view(-1, 1, 1, 1)).flatten(1)
        with autocast:
            emb = encode_text(tokenizer, text_encoder, prompts, L)
            pred = transformer(hidden_states=xt, timestep=timestep, encoder_hidden_states=emb,
                               return_dict=False)[0]
        err = (pred.float() - (noise - x0)).pow(2)
        w = (1 + t["object_weight"] * masks[idx].to(DEVICE, torch.float32)
             + t["shape_weight"] * shape_masks[idx].to(DEVICE, torch.float32)
             * (s <= t["shape_max_sigma"])) * mask
        loss = (err * w).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(t["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((transformer, ema_tr), (text_encoder, ema_te)):
                for ps, pd in zip(src.parameters(), dst.parameters()):
                    pd.lerp_(ps, 1 - decay)
        steps_run = step + 1
        losses.append(loss.item())
        plain.append(((err * mask).sum() / (mask.sum() * err.shape[1])).item())
        if step % 25 == 0 or step == t["steps"] - 1:
            el = time.time() - start
            log(f"dit step {step + 1}/{t['steps']} loss {np.mean(losses[-25:]):.4f} (unweighted "
                f"{np.mean(plain[-25:]):.4f}) lr {lr:.2e} {el / (step + 1):.2f} s/step")
        if checkpoint and (step + 1) % checkpoint[0] == 0 and step + 1 < t["steps"]:
            checkpoint[1](step + 1, ema_tr, ema_te)
    record["transformer"] = {"parameters": n_tr, "text_encoder_parameters": n_te,
                             "encode_seconds": round(encode_seconds, 1), "steps_run": steps_run,
                             "seconds": round(time.time() - start, 1),
                             "final_flow_matching_loss": float(np.mean(losses[-100:])),
                             "final_unweighted_flow_matching_loss": float(np.mean(plain[-100:]))}
    return ema_tr, ema_te


# ---------------------------------------------------------------------------------------------


def save(out: pathlib.Path, cfg, tokenizer, text_encoder, transformer, vae, record):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
        flow_shift=cfg["inference"]["flow_shift"], solver_order=2, solver_type="bh2",
        predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    )
    text_encoder, transformer, vae = text_encoder.cpu(), transformer.cpu(), vae.cpu()
    # expand_timesteps: per-token timesteps, and diffusers' WanImageToVideoPipeline (and Kino)
    # take a first image the Wan2.2 TI2V way (dit_train.image_cond).
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                       vae=vae, scheduler=scheduler,
                       expand_timesteps=cfg["dit_train"]["image_cond"] > 0)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    inf = cfg["inference"]
    (out / "kino.json").write_text(json.dumps({
        "width": cfg["width"], "height": cfg["height"], "num_frames": cfg["num_frames"],
        "fps": cfg["fps"], "num_inference_steps": inf["num_inference_steps"],
        "guidance_scale": inf["guidance_scale"], "negative_prompt": "",
        "max_sequence_length": cfg["max_sequence_length"],
    }, indent=2) + "\n")
    held = world.held_out(**cfg["held_out"])
    (out / "kino-eval.json").write_text(json.dumps(world.eval_spec(held, **cfg["world"]), indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path, required=True, help="model folder to write")
    ap.add_argument("--smoke", action="store_true", help="a few steps on a tiny batch (tests)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu",
                    help="torch device to train on, e.g. cuda (the record names the GPU)")
    ap.add_argument("--dit-steps", type=int)
    ap.add_argument("--dit-lr", type=float, help="peak transformer learning rate")
    ap.add_argument("--dit-lr-floor", type=float,
                    help="fraction of the peak learning rate the cosine schedule ends at (0.05)")
    ap.add_argument("--dit-batch", type=int, help="clips a transformer step (dit_train.batch)")
    ap.add_argument("--encode-batch", type=int,
                    help="clips drawn and encoded at once (dit_train.encode_batch)")
    ap.add_argument("--dit-shift", type=float, nargs="+",
                    help="flow shift(s) of the transformer's training noise levels, one drawn per "
                         "clip (dit_train.flow_shift)")
    ap.add_argument("--object-weight", type=float,
                    help="extra loss weight of the object's latent cells (dit_train.object_weight)")
    ap.add_argument("--shape-weight", type=float,
                    help="extra loss weight of the cells that tell the shapes apart "
                         "(dit_train.shape_weight)")
    ap.add_argument("--image-cond", type=float,
                    help="fraction of clips trained with a clean first frame at timestep 0, the "
                         "Wan2.2 TI2V way (dit_train.image_cond); 0: text-to-video only")
    ap.add_argument("--cond-roundtrip", type=float,
                    help="fraction of the image-conditioned clips whose first frame is the VAE "
                         "round trip of theirs, as a long video's later segments get it "
                         "(dit_train.cond_roundtrip)")
    ap.add_argument("--cond-blur", type=float,
                    help="with --cond-roundtrip: blur the decoded frame by up to this sigma, px")
    ap.add_argument("--cond-noise", type=float,
                    help="with --cond-roundtrip: add noise of up to this std to its latent")
    ap.add_argument("--sample-shift", type=float,
                    help="the sampler's flow shift written to the model (inference.flow_shift)")
    ap.add_argument("--latent-cache", type=pathlib.Path,
                    help="keep the encoded training clips in this file and reuse them next run")
    ap.add_argument("--save-every", type=int,
                    help="also save the (EMA) model every N transformer steps, to OUT/step-N")
    ap.add_argument("--clips", type=int)
    ap.add_argument("--stage", choices=["all", "vae", "vae-decoder", "vae-finetune"], default="all",
                    help="vae: train and save only the VAE (OUT/vae), for a later --vae-from; "
                         "vae-decoder: fine-tune the decoder of --vae-from's VAE (encoder and "
                         "latents unchanged) and save it as OUT/vae; vae-finetune: train "
                         "--vae-from's whole VAE further on batches drawn on --device and save "
                         "it as OUT/vae (the latents change: train a transformer on it next)")
    ap.add_argument("--finetune-steps", type=int,
                    help="with --stage vae-finetune: steps (vae_finetune_train)")
    ap.add_argument("--finetune-batch", type=int,
                    help="with --stage vae-finetune: clips a step (vae_finetune_train)")
    ap.add_argument("--finetune-max-minutes", type=float,
                    help="with --stage vae-finetune: stop after this long (the learning rate "
                         "anneals on the clock)")
    ap.add_argument("--dit-max-minutes", type=float,
                    help="stop the transformer's training after this long (the learning rate "
                         "anneals on the clock)")
    ap.add_argument("--finetune-shape-weight", type=float,
                    help="with --stage vae-finetune: extra weight of the pixels where the shapes "
                         "differ (vae_finetune_train.shape_weight)")
    ap.add_argument("--decoder-shape-weight", type=float,
                    help="with --stage vae-decoder: extra loss weight of the pixels where the "
                         "shapes differ (vae_decoder_train.shape_weight)")
    ap.add_argument("--decoder-steps", type=int, nargs="+",
                    help="with --stage vae-decoder: steps of each phase (vae_decoder_train.phases)")
    ap.add_argument("--vae-resume", type=pathlib.Path,
                    help="start the VAE from this vae/ folder (an earlier --stage vae run)")
    ap.add_argument("--vae-resume-phase", type=int, default=1,
                    help="with --vae-resume: the first VAE phase to run (earlier ones are done)")
    ap.add_argument("--dit-resume", type=pathlib.Path,
                    help="start the transformer and text encoder from this earlier model folder")
    ap.add_argument("--vae-from", type=pathlib.Path,
                    help="reuse the VAE of an earlier run (its vae/ folder) instead of training one")
    ap.add_argument("--vae-scratch", action="store_true",
                    help="with --stage vae-finetune: start from a new, untrained VAE (the --vae-dim-mult / "
                         "--vae-temporal-downsample architecture) instead of --vae-from: the batched "
                         "whole-clip training on a GPU, from the start")
    ap.add_argument("--vae-dim-mult", type=int, nargs="+",
                    help="a new VAE's dim_mult (vae.dim_mult; 2**(len - 1) is its spatial factor), e.g. 1 2")
    ap.add_argument("--vae-base-dim", type=int, help="a new VAE's base_dim (vae.base_dim, 16)")
    ap.add_argument("--vae-temporal-downsample", type=int, nargs="+",
                    help="a new VAE's temperal_downsample, 0 or 1 per stage (len(dim_mult) - 1 values)")
    ap.add_argument("--patch-size", type=int, nargs=3,
                    help="the transformer's patch_size (transformer.patch_size), e.g. 1 4 4 on a 2x VAE")
    ap.add_argument("--finetune-lr", type=float, help="peak learning rate of the vae-finetune stage")
    ap.add_argument("--dit-init-from", type=pathlib.Path,
                    help="start the transformer and text encoder from this earlier model folder where "
                         "the tensors' shapes match (another patch size: fresh patch embedding and output)")
    args = ap.parse_args(argv)

    cfg = copy.deepcopy(CONFIG)
    if args.smoke:
        for k, v in SMOKE.items():
            cfg[k].update(v)
    if args.dit_steps is not None:
        cfg["dit_train"]["steps"] = args.dit_steps
    if args.dit_batch is not None:
        cfg["dit_train"]["batch"] = args.dit_batch
    if args.encode_batch is not None:
        cfg["dit_train"]["encode_batch"] = args.encode_batch
    if args.dit_lr is not None:
        cfg["dit_train"]["lr"] = args.dit_lr
    if args.dit_lr_floor is not None:
        if not 0 <= args.dit_lr_floor <= 1:
            ap.error("--dit-lr-floor is a fraction of the peak learning rate, between 0 and 1")
        cfg["dit_train"]["lr_floor"] = args.dit_lr_floor
    if args.dit_shift is not None:
        cfg["dit_train"]["flow_shift"] = args.dit_shift
    if args.object_weight is not None:
        cfg["dit_train"]["object_weight"] = args.object_weight
    if args.shape_weight is not None:
        cfg["dit_train"]["shape_weight"] = args.shape_weight
    if args.sample_shift is not None:
        cfg["inference"]["flow_shift"] = args.sample_shift
    if args.image_cond is not None:
        cfg["dit_train"]["image_cond"] = args.image_cond
    if args.clips is not None:
        cfg["dit_train"]["clips"] = args.clips
    if args.decoder_shape_weight is not None:
        cfg["vae_decoder_train"]["shape_weight"] = args.decoder_shape_weight
    if args.decoder_steps is not None:
        phases = cfg["vae_decoder_train"]["phases"]
        if len(args.decoder_steps) != len(phases):
            ap.error(f"--decoder-steps takes {len(phases)} numbers, one per phase: "
                     + ", ".join(p["name"] for p in phases))
        for ph, n in zip(phases, args.decoder_steps):
            ph["steps"] = n
    ft = cfg["vae_finetune_train"]
    if args.finetune_steps is not None:
        ft["phases"][0]["steps"] = args.finetune_steps
    if args.finetune_batch is not None:
        ft["phases"][0]["batch"] = args.finetune_batch
    if args.finetune_max_minutes is not None:
        ft["max_seconds"] = 60 * args.finetune_max_minutes
    if args.dit_max_minutes is not None:
        cfg["dit_train"]["max_seconds"] = 60 * args.dit_max_minutes
    if args.finetune_shape_weight is not None:
        ft["shape_weight"] = args.finetune_shape_weight
    if args.finetune_lr is not None:
        ft["phases"][0]["lr"] = args.finetune_lr
    if args.vae_dim_mult is not None:
        cfg["vae"]["dim_mult"] = args.vae_dim_mult
    if args.vae_base_dim is not None:
        cfg["vae"]["base_dim"] = args.vae_base_dim
    if args.vae_temporal_downsample is not None:
        cfg["vae"]["temperal_downsample"] = [bool(v) for v in args.vae_temporal_downsample]
    if len(cfg["vae"]["temperal_downsample"]) != len(cfg["vae"]["dim_mult"]) - 1:
        ap.error(f"the VAE takes one temporal-downsample flag per stage: dim_mult {cfg['vae']['dim_mult']} "
                 f"has {len(cfg['vae']['dim_mult']) - 1}, --vae-temporal-downsample gave "
                 f"{len(cfg['vae']['temperal_downsample'])}")
    if args.patch_size is not None:
        cfg["transformer"]["patch_size"] = args.patch_size
    if args.vae_scratch and (args.vae_from or args.stage != "vae-finetune"):
        ap.error("--vae-scratch goes with --stage vae-finetune and without --vae-from")
    if args.dit_init_from and args.dit_resume:
        ap.error("--dit-init-from and --dit-resume: give one")
    for k in ("cond_roundtrip", "cond_blur", "cond_noise"):
        if getattr(args, k) is not None:
            cfg["dit_train"][k] = getattr(args, k)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])

    import diffusers
    import transformers

    record = {
        "config": cfg,
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(),
                    "threads": args.threads,
                    "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    t0 = time.time()
    exclude = world.held_out(**cfg["held_out"])
    tokenizer = build_tokenizer(cfg["max_sequence_length"])
    if args.vae_from:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(args.vae_from).to(DEVICE)
        record["vae"] = json.loads((args.vae_from.parent / "training.json").read_text()).get("vae") \
            if (args.vae_from.parent / "training.json").exists() else {"reused": str(args.vae_from)}
        cfg["vae"] = {k: vae.config[k] for k in cfg["vae"]}
        if args.stage in ("vae-decoder", "vae-finetune"):
            if args.stage == "vae-decoder":
                vae = train_vae_decoder(cfg, vae, cfg["seed"], exclude, record)
            else:
                vae = train_vae_finetune(cfg, vae, cfg["seed"], exclude, record)
            save_vae_stage(args.out, vae, record, t0)
            return
    elif args.vae_scratch:
        vae = new_vae(cfg, cfg["seed"])
        record["vae"] = {"scratch": True, "parameters": sum(p.numel() for p in vae.parameters()),
                         "phases": []}
        save_vae_stage(args.out, train_vae_finetune(cfg, vae, cfg["seed"], exclude, record), record, t0)
        return
    elif args.stage in ("vae-decoder", "vae-finetune"):
        ap.error(f"--stage {args.stage} trains an existing VAE further: give it with --vae-from DIR/vae "
                 "(or --vae-scratch for a new one)")
    else:
        resume = None
        if args.vae_resume:
            from diffusers import AutoencoderKLWan

            resume = (AutoencoderKLWan.from_pretrained(args.vae_resume), args.vae_resume_phase,
                      args.vae_resume)
        vae = train_vae(cfg, cfg["seed"], exclude, record, resume)
        if args.stage == "vae":
            vae.save_pretrained(args.out / "vae", safe_serialization=True)
            (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
            log(f"saved {args.out / 'vae'}")
            return
    checkpoint = None
    if args.save_every:
        def checkpoint_fn(step, tr, te):
            # Copies: save() moves what it is given to the CPU, and these keep training. (The
            # VAE is done: the clips are encoded.)
            save(args.out / f"step-{step}", cfg, tokenizer, copy.deepcopy(te).cpu(),
                 copy.deepcopy(tr).cpu(), vae, record)
        checkpoint = (args.save_every, checkpoint_fn)
    transformer, text_encoder = train_dit(cfg, vae, tokenizer, cfg["seed"], exclude, record,
                                          args.dit_resume, checkpoint, args.latent_cache,
                                          args.dit_init_from)
    record["total_seconds"] = round(time.time() - t0, 1)
    save(args.out, cfg, tokenizer, text_encoder, transformer, vae, record)


def save_vae_stage(out: pathlib.Path, vae, record: dict, t0: float) -> None:
    """What a VAE-only stage leaves: OUT/vae and OUT/training.json."""
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    record["total_seconds"] = round(time.time() - t0, 1)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {out / 'vae'}")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
