"""Train kino-shapes-vace: kino-shapes with a VACE control branch (masks, references, continuing).

    python training/train_vace.py --out models/kino-shapes-vace --threads 2 --max-minutes 52
                                                          # the shipped run's settings (2 cores)
    python training/train_vace.py --out /tmp/v --smoke                          # checks the script
    python training/train_vace.py --out OUT --init models/kino-shapes-vace \
        --tasks reference=0.55,edit=0.2,continue=0.13,text=0.06,image=0.06     # trains it further

Starts from the shipped `models/kino-shapes` (its VAE, text encoder, tokenizer and scheduler
unchanged): the transformer becomes a diffusers `WanVACETransformer3DModel` with the same config
plus `vace_layers` and `vace_in_channels` = 2·z_dim + s² (s = 2^len(temperal_downsample) = 4 for
this VAE: 48). The main blocks keep kino-shapes' weights and are frozen (as is the text encoder):
only the VACE branch learns (`vace_patch_embedding` and the VACE blocks, each initialised from a
copy of the main block it feeds, `proj_in` / `proj_out` zero, as the original VACE does), so at
step 0 the model is exactly kino-shapes, what it learnt for text and shapes cannot be forgotten in
a short CPU run, and the branch learns only how the control latents change the prediction.
`--train-main 2 3` also trains those main blocks; `--init DIR` starts the branch from a trained
folder (its earlier runs are carried into the new training.json's `runs`); `--tasks` changes
the mix.

Control latents are built as `WanVACEPipeline` builds them at inference (`control_latents` below
replicates `preprocess_conditions` / `prepare_video_latents` / `prepare_masks` batched, and
`check_against_pipeline` asserts equality with those methods, called on a `WanVACEPipeline`, for
one sample of every task before training starts). The tasks, all from `world.py` scenes (the
held-out combinations of `world.held_out()` never appear, as source or target):

- edit: a clip of object A; mask = the object's box, dilated, in every frame; the masked region
  gray 128 (or, for some, the original pixels: `kino edit --keep-masked`); target = the same clip
  with the object in the caption's colour; the background outside the mask identical;
- reference: the object alone on white (gray for a white object) at another size and position,
  prepended as a reference image; no video; the caption leaves out colour, shape or both; target
  = a clip of that object (the reference's latent frame in front, as the pipeline's noise has it);
- continue: the first 5 frames kept (mask 0), the rest gray with mask 1 (what
  `WanPipeline::vace_condition` builds for a continuation of 17 frames); half the clips turn
  after frame 4 (the caption names the new direction), as a long video's next segment does;
- text: no video (zeros, mask ones), as plain text-to-video on a VACE model;
- image: frame 0 kept, the rest gray (a first image on a VACE model).

The samples are rendered and encoded once (the VAE encodes dominate a CPU run); captions are
re-drawn from the grammar at every step. Checkpoints (EMA) every `--save-every` steps.
`--object-weight` / `--shape-weight` weigh the loss towards the target's object and the cells that
tell the shapes apart (CONFIG below; the shipped run 5 used 3 then 6, and 8). `--distill W`
adds, for reference samples, a loss towards the main model's own prediction given the full caption
(see CONFIG["distill"]); `--feature-distill`, `--ref-variants`, `--ref-aligned`, `--aux` and
`--aux-min-sigma` are the other signals stop 41 tried for a reference's shape (CONFIG;
`training/vace_probe.py` measures whether a branch reads the shape at all).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import platform
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train  # noqa: E402
import world  # noqa: E402
from train import encode_mean, encode_text, log, shift_sigma, to_tensor  # noqa: E402

CONFIG = {
    "seed": 0,
    "base": "models/kino-shapes",
    "vace_layers": [0, 1, 2, 3],
    # Fractions of the training samples per task.
    "tasks": {"edit": 0.35, "reference": 0.25, "continue": 0.22, "text": 0.09, "image": 0.09},
    "samples": 1000,
    "edit": {"margin": [2, 5], "keep_masked": 0.25},
    "continue": {"context": 5, "turn": 0.5},
    "steps": 3000,
    "batch": 8,
    "lr": 8e-4,
    "warmup": 30,
    "ema": 0.99,
    "caption_dropout": 0.1,
    "flow_shift": [10.0, 2.0],
    "bf16": True,
    "encode_batch": 16,
    # The flow-matching loss on latent cells the target's object touches (dilated by a cell)
    # counts 1 + object_weight times, and on cells where the three shapes would differ
    # (world.shape_difference) 1 + shape_weight more at noise levels up to shape_max_sigma, as
    # train.py's dit_train weighs them: the object is a few percent of a clip, and a reference's
    # colour and shape live only there. 0 and 0: every cell alike (the runs up to r4).
    "object_weight": 0.0,
    "shape_weight": 0.0,
    "shape_max_sigma": 0.8,
    # Reference samples whose caption leaves something out also learn from a teacher: the main
    # model alone (no control, as kino-shapes runs) given the sample's full caption predicts the
    # video frames' velocity at the same noisy latents, and the branch's prediction with the
    # reference and the partial caption is pulled towards it with this weight (0: off, the runs
    # up to r6). The teacher's target carries the colour and shape at every noise level without
    # the noise of a single sample's target, where the flow-matching loss alone left the shape
    # unlearnt.
    "distill": 0.0,
    # Each reference sample also gets this many other reference images of its object (same colour
    # and shape, another size and place), encoded once; every step draws one of them or the
    # sample's own. 825 reference images are few for learning to read a shape wherever and at
    # whatever size it is drawn (0: only the sample's own, the runs up to r8).
    "ref_variants": 0,
    # An auxiliary loss for reference samples: two linear heads (trained here, not saved) read the
    # reference's shape and colour from the last VACE block's hint, averaged over the tokens the
    # target's object covers in the video frames, with this weight on their cross-entropy. It asks
    # the branch to carry the reference's shape to where the object is drawn, which neither
    # the flow-matching loss nor the teacher made it do (0: off, the runs up to r9).
    "aux": 0.0,
    # With ref_variants: the share of steps whose reference sample gets a drawing centred where
    # the clip's object starts (estimated from its latent cells), so the branch can find it at
    # the same place (a curriculum's first stage; kino eval draws references anywhere).
    "ref_aligned": 0.0,
    # ... only on samples at noise levels from this one up: below it the object's shape shows in
    # the noisy latents themselves, which the branch also sees (its first block adds the main
    # stream), and the heads learnt to read it there instead of from the reference.
    "aux_min_sigma": 0.9,
    # With the teacher (distill > 0): also pull the main stream's hidden states after each main
    # block and its hint (the reference frame's tokens left out) towards the teacher's after the
    # same block, the object's tokens weighted 1 + 8, each layer's error over the teacher's mean
    # square, with this weight. The hint then has a target of its own at every layer, where the
    # output's error reaches it only through the frozen blocks after it (0: off).
    "feature_distill": 0.0,
    # An auxiliary loss that asks the branch to *recognise* the reference first: a linear head
    # (trained here, not saved) reads the reference's shape from the second VACE block's hidden
    # states averaged over the reference frame's tokens, with this weight on its cross-entropy, at
    # noise levels from aux_min_sigma up. A small CNN reads the shape off the reference's latent
    # in 100% of held-out drawings (stop 42), so the information is there; the branch's hints did
    # not carry it (0: off).
    "aux_ref": 0.0,
}
SMOKE = {"samples": 10, "steps": 2, "batch": 4, "warmup": 1, "encode_batch": 4}

# The box kino eval masks an object with (pixels beyond the drawn object, each side).
EVAL_MARGIN = 3
GRAY = 128


# ---------------------------------------------------------------------------------------------
# Scenes


@dataclasses.dataclass
class TurnScene(world.Scene):
    """A scene whose object moves `motion` until frame `turn` and `motion2` after it, at the
    same speed: the next segment of a long video that turns."""

    motion2: str = "right"
    turn: int = 4

    def centre(self, frame, frames):
        step = self.travel / max(frames - 1, 1)
        k = min(frame, self.turn)
        dx, dy = world.DIRECTION[self.motion]
        x, y = self.x0 + dx * step * k, self.y0 + dy * step * k
        if frame > self.turn:
            dx2, dy2 = world.DIRECTION[self.motion2]
            x += dx2 * step * (frame - self.turn)
            y += dy2 * step * (frame - self.turn)
        return x, y


def sample_turn_scene(combo, motion2, turn, w, h, frames, rng):
    c, s, m, b = combo
    for _ in range(1000):
        size = rng.uniform(*world.SIZE_RANGE)
        travel = rng.uniform(*world.TRAVEL_RANGE)
        half = size / 2 + 1
        sc = TurnScene(c, s, m, b, size, rng.uniform(half, w - half), rng.uniform(half, h - half),
                       travel, motion2, turn)
        pts = [sc.centre(f, frames) for f in range(frames)]
        if all(half <= x <= w - half and half <= y <= h - half for x, y in pts):
            return sc
    raise RuntimeError("no turning path fits the frame")


def box_masks(scene, w, h, frames, margin) -> np.ndarray:
    """[frames, h, w] float32: 1 inside the object's bounding box grown by `margin` px."""
    out = np.zeros((frames, h, w), np.float32)
    r = scene.size / 2 + margin
    for f in range(frames):
        cx, cy = scene.centre(f, frames)
        x0, x1 = max(0, math.floor(cx - r)), min(w, math.ceil(cx + r))
        y0, y1 = max(0, math.floor(cy - r)), min(h, math.ceil(cy + r))
        out[f, y0:y1, x0:x1] = 1.0
    return out


def reference_image(colour, shape, w, h, rng, at=None) -> np.ndarray:
    """[h, w, 3] uint8: the object alone at a random size and place (or centred `at` (x, y)), on
    white (gray if white)."""
    size = rng.uniform(*world.SIZE_RANGE)
    half = size / 2 + 1
    bg = "gray" if colour == "white" else "white"
    cx, cy = at if at is not None else (rng.uniform(half, w - half), rng.uniform(half, h - half))
    sc = world.Scene(colour, shape, "right", bg, size, cx, cy, 0.0)
    return world.render(sc, w, h, 1)[0]


def _motion_bg(m, b, rng):
    mw = rng.choice(world._MOTION_WORDS[m])
    bw = rng.choice(world._BG_WORDS[b])
    return f"{mw} on a {bw} background"


def reference_caption(colour, shape, motion, background, rng) -> str:
    """A caption that leaves out the colour, the shape or both (the reference gives them)."""
    u = rng.random()
    if u < 0.35:  # no colour
        sw = rng.choice(world._SHAPE_WORDS[shape])
        return f"a {sw} {_motion_bg(motion, background, rng)}"
    if u < 0.6:  # no shape
        return f"a {colour} object {_motion_bg(motion, background, rng)}"
    if u < 0.9:  # neither (what kino eval --reference asks)
        return f"an object {_motion_bg(motion, background, rng)}"
    return world.caption(colour, shape, motion, background, rng)


# ---------------------------------------------------------------------------------------------
# Control latents, as WanVACEPipeline builds them


def spatial_factor(vae) -> int:
    """WanVACEPipeline.vae_scale_factor_spatial: 2 ** len(temperal_downsample)."""
    return 2 ** len(vae.temperal_downsample)


class Encoder:
    """VAE posterior means, normalised as the pipeline does, memoised by content (the gray and
    zero videos recur)."""

    def __init__(self, vae):
        self.vae = vae
        self.mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        self.memo = {}
        self.encoded = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, F, H, W] → [B, z, T, h, w]."""
        keys = [hashlib.sha1(x[i].cpu().numpy().tobytes()).hexdigest() for i in range(len(x))]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        todo = list({keys[i]: i for i in todo}.values())
        if todo:
            dev = next(self.vae.parameters()).device
            with torch.no_grad():
                mu = encode_mean(self.vae, x[todo].to(dev))
            mu = (mu.float().cpu() - self.mean) * self.inv_std
            for j, i in enumerate(todo):
                self.memo[keys[i]] = mu[j]
            self.encoded += len(todo)
        return torch.stack([self.memo[k] for k in keys])

    def forget_except(self, keep: set):
        self.memo = {k: v for k, v in self.memo.items() if k in keep}


def mask_channels(mask: torch.Tensor, s: int, t_scale: int, refs: int) -> torch.Tensor:
    """WanVACEPipeline.prepare_masks, batched: mask [B, 1, F, H, W] (raw) → [B, s², R + T, h, w]
    (patch size 2 divides h and w here)."""
    b, _, f, h, w = mask.shape
    t = (f + t_scale - 1) // t_scale
    m = mask[:, 0].view(b, f, h // s, s, w // s, s).permute(0, 3, 5, 1, 2, 4).flatten(1, 2)
    m = F.interpolate(m, size=(t, h // s, w // s), mode="nearest-exact")
    if refs:
        m = torch.cat([torch.zeros_like(m[:, :, :refs]), m], dim=2)
    return m


def control_latents(enc: Encoder, video, mask, refs=None) -> torch.Tensor:
    """WanVACEPipeline.prepare_video_latents + prepare_masks, batched: video [B, 3, F, H, W] in
    [-1, 1], mask [B, 1, F, H, W] in [0, 1], refs None or [B, 3, H, W] in [-1, 1] (one reference
    each, already the frame's size: no letterbox) → [B, 2z + s², R + T, h, w]."""
    mb = torch.where(mask > 0.5, 1.0, 0.0)
    lat = torch.cat([enc(video * (1 - mb)), enc(video * mb)], dim=1)
    if refs is not None:
        r = enc(refs[:, :, None])
        lat = torch.cat([torch.cat([r, torch.zeros_like(r)], dim=1), lat], dim=2)
    vae = enc.vae
    m = mask_channels(mask, spatial_factor(vae), 2 ** sum(vae.temperal_downsample),
                      0 if refs is None else 1)
    return torch.cat([lat, m], dim=1)


def check_against_pipeline(pipe, enc, samples, w, h, frames):
    """The batched control latents equal WanVACEPipeline's own for one sample of every task."""
    from PIL import Image

    seen = set()
    for s in samples:
        if s["task"] in seen:
            continue
        seen.add(s["task"])
        video = [Image.fromarray(f) for f in s["video"]] if s["video"] is not None else None
        mask = ([Image.fromarray(np.repeat((m * 255).astype(np.uint8)[..., None], 3, -1))
                 for m in s["mask"]] if s["mask"] is not None else None)
        refs = [Image.fromarray(s["ref"])] if s["ref"] is not None else None
        dev = next(pipe.vae.parameters()).device
        with torch.no_grad():
            v, m, r = pipe.preprocess_conditions(video, mask, refs, 1, h, w, frames, torch.float32,
                                                 dev)
            want = torch.cat([pipe.prepare_video_latents(v, m, r, None, dev),
                              pipe.prepare_masks(m, r, None)], dim=1).cpu()
        got = sample_control(enc, [s], w, h, frames)
        diff = (want - got).abs().max().item()
        log(f"control latents, task {s['task']}: shape {tuple(got.shape)}, max difference from "
            f"WanVACEPipeline {diff:.2e}")
        assert want.shape == got.shape and diff < 1e-4, (want.shape, got.shape, diff)


def pixels(clip_u8: np.ndarray) -> torch.Tensor:
    return to_tensor([clip_u8])


def sample_control(enc, group, w, h, frames):
    """Control latents of samples that share a layout (all with a reference or none)."""
    vids, masks, refs = [], [], []
    for s in group:
        if s["video"] is None:
            vids.append(torch.zeros(1, 3, frames, h, w))
            masks.append(torch.ones(1, 1, frames, h, w))
        else:
            vids.append(pixels(s["video"]))
            masks.append(torch.from_numpy(s["mask"])[None, None])
        if s["ref"] is not None:
            refs.append(pixels(s["ref"][None])[:, :, 0])
    return control_latents(enc, torch.cat(vids), torch.cat(masks),
                           torch.cat(refs) if refs else None)


# ---------------------------------------------------------------------------------------------
# Samples


def make_sample(task, rng, combos, cfg, w, h, frames):
    """A dict: task, target clip (uint8 [F, H, W, 3]), video (uint8 or None), mask (float32
    [F, H, W] or None), ref (uint8 [H, W, 3] or None), and what the caption is drawn from."""
    allowed = set(combos)
    while True:
        combo = rng.choice(combos)
        c, s, m, b = combo
        if task == "edit":
            c1 = rng.choice([x for x in world.COLOURS if x not in (c, b)])
            if (c1, s, m, b) not in allowed:
                continue
            scene = world.sample_scene(combo, w, h, rng)
            target = world.render(scene, w, h, frames)
            source = world.render(dataclasses.replace(scene, colour=c1), w, h, frames)
            mask = box_masks(scene, w, h, frames, rng.uniform(*cfg["edit"]["margin"]))
            video = source.copy()
            if rng.random() >= cfg["edit"]["keep_masked"]:
                video[mask > 0.5] = GRAY
            return dict(task=task, target=target, video=video, mask=mask, ref=None,
                        caption=("full", combo), scene=scene)
        if task == "reference":
            scene = world.sample_scene(combo, w, h, rng)
            return dict(task=task, target=world.render(scene, w, h, frames), video=None, mask=None,
                        ref=reference_image(c, s, w, h, rng), caption=("reference", combo),
                        scene=scene)
        if task == "continue":
            k = cfg["continue"]["context"]
            m2 = rng.choice([x for x in world.MOTIONS if x != m]) \
                if rng.random() < cfg["continue"]["turn"] else m
            if (c, s, m2, b) not in allowed:
                continue
            scene = sample_turn_scene(combo, m2, k - 1, w, h, frames, rng)
            target = world.render(scene, w, h, frames)
            video = target.copy()
            video[k:] = GRAY
            mask = np.ones((frames, h, w), np.float32)
            mask[:k] = 0
            return dict(task=task, target=target, video=video, mask=mask, ref=None,
                        caption=("full", (c, s, m2, b)), scene=scene)
        scene = world.sample_scene(combo, w, h, rng)
        target = world.render(scene, w, h, frames)
        if task == "text":
            return dict(task=task, target=target, video=None, mask=None, ref=None,
                        caption=("full", combo), scene=scene)
        video = np.full_like(target, GRAY)
        video[0] = target[0]
        mask = np.ones((frames, h, w), np.float32)
        mask[0] = 0
        return dict(task="image", target=target, video=video, mask=mask, ref=None,
                    caption=("full", combo), scene=scene)


def draw_caption(spec, rng):
    kind, combo = spec
    return world.caption(*combo, rng) if kind == "full" else reference_caption(*combo, rng)


def loss_cells(part, x, vae, w, h, frames):
    """The latent cells the loss weighs more for samples `part` with target clips `x`
    [B, 3, F, H, W]: the object's (train.latent_object_mask) and those where the three shapes
    would differ (train.latent_shape_mask of world.shape_difference of each target's scene),
    uint8 [B, 1, F', H', W'] each."""
    diff = torch.from_numpy(np.stack([world.shape_difference(s["scene"], w, h, frames)
                                      for s in part]))
    return train.latent_object_mask(x, vae), train.latent_shape_mask(diff, vae)


def object_tokens(cells: torch.Tensor, patch) -> torch.Tensor:
    """The object's latent cells [B, T, H, W] (0/1) → [B, tokens] in the transformer's token order:
    1 where a token's patch holds any of them."""
    b, t, h, w = cells.shape
    _, ph, pw = patch
    return cells.view(b, t, h // ph, ph, w // pw, pw).amax(dim=(3, 5)).flatten(1)


def build_dataset(cfg, enc, combos, w, h, frames, seed, pipe=None):
    rng = random.Random(seed)
    n = cfg["samples"]
    tasks = []
    for name, frac in cfg["tasks"].items():
        tasks += [name] * max(1, round(frac * n))
    rng.shuffle(tasks)
    samples = [make_sample(t, rng, combos, cfg, w, h, frames) for t in tasks]
    if pipe is not None:
        check_against_pipeline(pipe, enc, samples, w, h, frames)
    start = time.time()
    data = []
    eb = cfg["encode_batch"]
    for ref in (False, True):
        group = [s for s in samples if (s["ref"] is not None) == ref]
        for i in range(0, len(group), eb):
            part = group[i : i + eb]
            ctrl = sample_control(enc, part, w, h, frames)
            x = to_tensor([s["target"] for s in part])
            tgt = enc(x)
            obj, shp = loss_cells(part, x, enc.vae, w, h, frames)
            if ref:
                r = enc(to_tensor([s["ref"][None] for s in part]))
                tgt = torch.cat([r, tgt], dim=2)
                # The reference's own latent frame: no object or shape cells of the target.
                obj = torch.cat([torch.zeros_like(obj[:, :, :1]), obj], dim=2)
                shp = torch.cat([torch.zeros_like(shp[:, :, :1]), shp], dim=2)
            assert obj.shape[2:] == tgt.shape[2:], (obj.shape, tgt.shape)
            for j, s in enumerate(part):
                data.append(dict(task=s["task"], caption=s["caption"], x0=tgt[j].clone(),
                                 control=ctrl[j].clone(), obj=obj[j].clone(), shp=shp[j].clone()))
            # Only the recurring encodes (gray and zero videos) are worth keeping.
            enc.forget_except(set(list(enc.memo)[:64]))
            done = i + len(part)
            if done % (eb * 8) < eb or done == len(group):
                log(f"encoded {'reference' if ref else 'video'} samples {done}/{len(group)} "
                    f"({enc.encoded} VAE encodes, {time.time() - start:.0f} s)")
    return data, time.time() - start


# ---------------------------------------------------------------------------------------------
# Model


def add_ref_variants(data, enc, cfg, w, h, cache: pathlib.Path | None) -> float:
    """Gives every reference sample `cfg["ref_variants"]` more reference latents ("refs",
    [K, z, h', w']): its object drawn again at another size and place, the last one centred where
    the clip's object starts (ref_aligned), encoded as the sample's own (kept in CACHE.refs-K.pt
    beside the data cache). Returns the seconds spent encoding."""
    k = cfg["ref_variants"]
    idx = [i for i, d in enumerate(data) if d["caption"][0] == "reference"]
    path = cache.with_suffix(f".refs-{k}.pt") if cache else None
    key = {"seed": cfg["seed"], "n": len(idx), "k": k, "aligned_last": 1}
    if path and path.exists():
        got = torch.load(path)
        if got.get("key") == key:
            for i, r in zip(idx, got["refs"]):
                data[i]["refs"] = r
            log(f"{k} more reference images per reference sample from {path}")
            return 0.0
    start, rng, refs = time.time(), random.Random(cfg["seed"] + 7), []
    for n, i in enumerate(idx):
        c, shp = data[i]["caption"][1][:2]
        cells = data[i]["obj"][0, 1].float()  # latent frame of pixel frame 0
        ys, xs = torch.nonzero(cells, as_tuple=True)
        f = h / cells.shape[0]
        at = (float(xs.float().mean() + 0.5) * f, float(ys.float().mean() + 0.5) * f)
        # The last drawing is centred where the clip's object starts (ref_aligned).
        imgs = [reference_image(c, shp, w, h, rng, at=at if j == k - 1 else None)[None]
                for j in range(k)]
        refs.append(enc(to_tensor(imgs))[:, :, 0].clone())
        data[i]["refs"] = refs[-1]
        enc.forget_except(set())
        if (n + 1) % 100 == 0:
            log(f"reference variants {n + 1}/{len(idx)} ({time.time() - start:.0f} s)")
    if path:
        torch.save({"key": key, "refs": refs}, path)
    return time.time() - start


def build_transformer(base: pathlib.Path, vace_layers, vae):
    from diffusers import WanVACETransformer3DModel
    from safetensors.torch import load_file

    cfg = json.loads((base / "transformer" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    s = spatial_factor(vae)
    z = vae.config.z_dim
    tr = WanVACETransformer3DModel(**cfg, vace_layers=list(vace_layers),
                                   vace_in_channels=2 * z + s * s)
    sd = load_file(base / "transformer" / "diffusion_pytorch_model.safetensors")
    missing, unexpected = tr.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith("vace_") for k in missing), missing
    with torch.no_grad():
        for i, layer in enumerate(vace_layers):
            vb = tr.vace_blocks[i]
            src = tr.blocks[layer].state_dict()
            own = vb.state_dict()
            vb.load_state_dict({k: src.get(k, v) for k, v in own.items()})
            for proj in (vb.proj_in, vb.proj_out):
                if proj is not None:
                    proj.weight.zero_()
                    proj.bias.zero_()
        # The control's patch embedding starts as the main one on each latent group (inactive,
        # reactive), mask channels zero; it only matters once proj_in leaves zero.
        pe = tr.patch_embedding.weight
        vpe = tr.vace_patch_embedding.weight
        vpe.zero_()
        vpe[:, :z] = pe * 0.5
        vpe[:, z : 2 * z] = pe * 0.5
        tr.vace_patch_embedding.bias.copy_(tr.patch_embedding.bias)
    return tr


def load_branch(tr, init: pathlib.Path, main_from_base: bool = False):
    """Starts from a trained folder: its VACE branch, and its main blocks where an earlier run
    trained them (`--train-main`) or they came from an older base, unless `main_from_base` (then
    only the `vace_` tensors: the branch moves onto --base's main blocks); the folder must have
    the same config as the one built from --base."""
    from safetensors.torch import load_file

    sd = load_file(init / "transformer" / "diffusion_pytorch_model.safetensors")
    own = tr.state_dict()
    if set(sd) != set(own) or any(sd[k].shape != own[k].shape for k in sd):
        raise SystemExit(f"--init {init}: its transformer's tensors differ from the one built "
                         f"from --base (vace_layers or config differ)")
    if main_from_base:
        sd = {k: v if k.startswith("vace_") else own[k] for k, v in sd.items()}
    changed = sorted({k.split(".")[1] for k, v in sd.items()
                      if k.startswith("blocks.") and not torch.equal(v.float(), own[k].float())})
    tr.load_state_dict(sd)
    log(f"VACE branch from {init}" + (f"; main blocks {', '.join(changed)} as trained there"
                                      if changed else ""))


def save(out: pathlib.Path, base: pathlib.Path, pipe_parts, record):
    from diffusers import WanVACEPipeline

    tok, te, tr, vae, sched = pipe_parts
    pipe = WanVACEPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, transformer=tr)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    for f in ("kino.json", "kino-eval.json"):
        shutil.copy(base / f, out / f)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {out}")


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--base", type=pathlib.Path, help="the kino-shapes folder to start from")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu",
                    help="torch device to train on, e.g. cuda (samples are drawn on the CPU, "
                         "encoded and trained on the device; the record names the GPU)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--samples", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--vace-layers", type=int, nargs="+")
    ap.add_argument("--object-weight", type=float,
                    help="extra loss weight of the latent cells the target's object touches")
    ap.add_argument("--shape-weight", type=float,
                    help="extra loss weight of the cells where the shapes would differ, at noise "
                         "levels up to shape_max_sigma")
    ap.add_argument("--distill", type=float,
                    help="weight of the teacher loss on reference samples: the main model given "
                         "the full caption, no control (0: off)")
    ap.add_argument("--ref-variants", type=int,
                    help="other reference images per reference sample (same object, another size "
                         "and place), one drawn per step")
    ap.add_argument("--aux", type=float,
                    help="weight of the auxiliary shape and colour heads on the last VACE hint "
                         "(reference samples; the heads are not saved)")
    ap.add_argument("--ref-aligned", type=float,
                    help="with --ref-variants: share of steps with a reference drawn where the "
                         "clip's object starts")
    ap.add_argument("--aux-min-sigma", type=float,
                    help="the auxiliary heads' loss (--aux, --aux-ref) only at noise levels from "
                         "this one up")
    ap.add_argument("--aux-ref", type=float,
                    help="weight of an auxiliary shape head on the second VACE block's hidden "
                         "states over the reference frame's tokens (reference samples)")
    ap.add_argument("--feature-distill", type=float,
                    help="with --distill: weight of matching the teacher's hidden states after "
                         "each main block")
    ap.add_argument("--save-every", type=int, help="save the EMA model every N steps to OUT/step-N")
    ap.add_argument("--max-minutes", type=float,
                    help="stop training (and save) after this many minutes of the whole run")
    ap.add_argument("--init", type=pathlib.Path,
                    help="a kino-shapes-vace folder to start from: its VACE branch, and its main "
                         "blocks where an earlier run trained them (same config as --base's)")
    ap.add_argument("--main-from-base", action="store_true",
                    help="with --init: take only its VACE branch; the main transformer stays "
                         "--base's (e.g. to move the branch onto a newer kino-shapes)")
    ap.add_argument("--train-main", type=int, nargs="+", metavar="BLOCK",
                    help="also train these main blocks (frozen by default), e.g. --train-main 2 3")
    ap.add_argument("--tasks", help="fractions of the samples per task, e.g. "
                                    "reference=0.55,edit=0.2,continue=0.13,text=0.06,image=0.06")
    ap.add_argument("--data-cache", type=pathlib.Path,
                    help="keep the encoded samples in this file and reuse them next run (a "
                         "file made with other --tasks, --samples or world settings is made "
                         "again and replaced)")
    args = ap.parse_args(argv)

    cfg = copy.deepcopy(CONFIG)
    if args.smoke:
        cfg.update(SMOKE)
    for k in ("steps", "samples", "batch", "lr", "object_weight", "shape_weight", "distill",
              "ref_variants", "aux", "aux_min_sigma", "ref_aligned",
              "feature_distill", "aux_ref"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.vace_layers:
        cfg["vace_layers"] = args.vace_layers
    if args.tasks:
        tasks = {}
        for part in args.tasks.split(","):
            name, _, frac = part.partition("=")
            if name not in CONFIG["tasks"]:
                ap.error(f"--tasks: unknown task {name!r} (known: {', '.join(CONFIG['tasks'])})")
            tasks[name] = float(frac)
        cfg["tasks"] = tasks
    if args.init:
        init_cfg = json.loads((args.init / "transformer" / "config.json").read_text())
        if not args.vace_layers:
            cfg["vace_layers"] = init_cfg["vace_layers"]
        cfg["init"] = str(args.init)
    if args.base:
        cfg["base"] = str(args.base)
    base = pathlib.Path(cfg["base"])
    if not base.is_absolute():
        base = HERE.parent / base
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    t0 = time.time()

    import diffusers
    import transformers
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACEPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    base_train = json.loads((base / "training.json").read_text())
    kino = json.loads((base / "kino.json").read_text())
    w, h, frames = kino["width"], kino["height"], kino["num_frames"]
    L = kino["max_sequence_length"]
    held = world.held_out(**base_train["config"]["held_out"])
    combos = [c for c in world.combinations() if c not in set(held)]

    tok = AutoTokenizer.from_pretrained(base / "tokenizer")
    te = UMT5EncoderModel.from_pretrained(base / "text_encoder").eval()
    vae = AutoencoderKLWan.from_pretrained(base / "vae").eval()
    sched = UniPCMultistepScheduler.from_pretrained(base / "scheduler")
    for p in list(te.parameters()) + list(vae.parameters()):
        p.requires_grad_(False)
    tr = build_transformer(base, cfg["vace_layers"], vae)
    if args.init:
        load_branch(tr, args.init, args.main_from_base)
        cfg["main_from_base"] = args.main_from_base
    if args.train_main:
        cfg["train_main"] = args.train_main
    main_prefixes = tuple(f"blocks.{i}." for i in cfg.get("train_main", []))

    def trained(name):
        return name.startswith("vace_") or name.startswith(main_prefixes)

    # Only the VACE branch learns, and the main blocks named by --train-main.
    for name, p in tr.named_parameters():
        p.requires_grad_(trained(name))
    n_all = sum(p.numel() for p in tr.parameters())
    n_train = sum(p.numel() for p in tr.parameters() if p.requires_grad)
    log(f"transformer {n_all / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M trained (VACE branch, "
        f"layers {cfg['vace_layers']}, vace_in_channels {tr.config.vace_in_channels}"
        + (f"; main blocks {cfg['train_main']}" if cfg.get("train_main") else "") + ")")
    te.to(dev)
    vae.to(dev)
    tr.to(dev)
    pipe = WanVACEPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, transformer=tr)

    record = {
        "config": cfg,
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": train._cpu_name(),
                    "threads": args.threads,
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": str(cfg["base"]),
        "transformer": {"parameters": n_all, "trained_parameters": n_train},
    }
    if args.init:
        # The runs the branch has already had, so the record tells its whole history.
        prior = json.loads((args.init / "training.json").read_text())
        record["runs"] = prior.get("runs", [])
        # ... and the run that made the --init folder itself (a checkpoint names its step).
        if prior.get("command") and all(r.get("command") != prior["command"]
                                        for r in record["runs"]):
            made = {k: prior[k] for k in ("command", "started", "steps_run") if k in prior}
            if "checkpoint_step" in prior:
                made["checkpoint_step"] = prior["checkpoint_step"]
            made["note"] = f"the run that made the --init folder ({args.init})"
            record["runs"].append(made)

    enc = Encoder(vae)
    # "cells": the samples also hold the loss-weighting cells (caches made before lack them).
    key = {k: cfg[k] for k in ("seed", "tasks", "samples", "edit", "continue")} | {"cells": 1}
    cached = torch.load(args.data_cache) if args.data_cache and args.data_cache.exists() else {}
    if cached.get("key") == key:
        data, enc_s = cached["data"], 0.0
        log(f"samples from {args.data_cache}")
    else:
        if cached:
            old = cached.get("key") or {}
            differ = sorted(k for k in set(key) | set(old) if key.get(k) != old.get(k))
            log(f"{args.data_cache} holds samples made with other settings ({', '.join(differ)}): "
                f"drawing and encoding them again, then replacing it (give another "
                f"--data-cache to keep it)")
        data, enc_s = build_dataset(cfg, enc, combos, w, h, frames, cfg["seed"] + 1, pipe)
        if args.data_cache:
            torch.save({"key": key, "data": data}, args.data_cache)
    if cfg["ref_variants"]:
        enc_s += add_ref_variants(data, enc, cfg, w, h, args.data_cache)
    record["encode_seconds"] = round(enc_s, 1)
    counts = {}
    for d in data:
        counts[d["task"]] = counts.get(d["task"], 0) + 1
    record["samples"] = counts
    log(f"{len(data)} samples {counts}, encoded in {enc_s:.0f} s")
    obj_frac = float(np.mean([d["obj"].float().mean().item() for d in data]))
    shp_frac = float(np.mean([d["shp"].float().mean().item() for d in data]))
    record["loss_cells"] = {"object": round(obj_frac, 4), "shape": round(shp_frac, 4)}
    log(f"loss weights: object cells {obj_frac:.3f} (weight 1 + {cfg['object_weight']}), "
        f"shape cells {shp_frac:.3f} (1 + {cfg['shape_weight']} at sigma <= "
        f"{cfg['shape_max_sigma']})")

    params = [p for p in tr.parameters() if p.requires_grad]
    # The teacher is the main model with the control off; where main blocks train too
    # (--train-main), a frozen copy of it as it starts, so the target does not move with them.
    teacher = tr
    if cfg["distill"] > 0 and cfg.get("train_main"):
        teacher = copy.deepcopy(tr).eval().requires_grad_(False)
        log(f"teacher: a frozen copy of the main blocks (main blocks {cfg['train_main']} train)")
    heads, captured = None, {}
    if cfg["aux"] > 0:
        dim = tr.config.num_attention_heads * tr.config.attention_head_dim
        heads = torch.nn.ModuleDict({"shape": torch.nn.Linear(dim, len(world.SHAPES)),
                                     "colour": torch.nn.Linear(dim, len(world.COLOURS))}).to(dev)
        tr.vace_blocks[-1].register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("hint", out[0]))
    if cfg["aux_ref"] > 0:
        dim = tr.config.num_attention_heads * tr.config.attention_head_dim
        heads = heads if heads is not None else torch.nn.ModuleDict()
        heads["ref_shape"] = torch.nn.Linear(dim, len(world.SHAPES)).to(dev)
        tr.vace_blocks[min(1, len(tr.vace_blocks) - 1)].register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("ref_states", out[1]))
    head_params = list(heads.parameters()) if heads is not None else []
    # The main stream after each main block and its hint: the input of the next block, and of
    # norm_out after the last (feature_distill).
    streams = []
    if cfg["feature_distill"] > 0:
        mods = list(tr.blocks)[1:] + [tr.norm_out]
        if teacher is not tr:
            mods += list(teacher.blocks)[1:] + [teacher.norm_out]
        for mod in mods:
            mod.register_forward_pre_hook(lambda _m, a: streams.append(a[0]))
    opt = torch.optim.AdamW(params + head_params, lr=cfg["lr"], weight_decay=0.01,
                            betas=(0.9, 0.99))
    ema = copy.deepcopy(tr).eval()
    ema_params = [p for n, p in ema.named_parameters() if trained(n)]
    rng = random.Random(cfg["seed"] + 2)
    g = torch.Generator().manual_seed(cfg["seed"] + 3)
    shifts = torch.tensor(cfg["flow_shift"])
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg["bf16"])
    tr.train()
    losses, per_task, gnorms, start = [], {}, [], time.time()
    record["steps_run"] = 0

    def checkpoint(step):
        save(args.out / f"step-{step}", base, (tok, te, copy.deepcopy(ema), vae, sched),
             dict(record, checkpoint_step=step))

    for step in range(cfg["steps"]):
        # With --max-minutes the schedule runs on whichever ends first, steps or time, so a
        # run cut by the clock still anneals its learning rate.
        frac = step / max(cfg["steps"], 1)
        if args.max_minutes:
            budget = args.max_minutes * 60 - (start - t0)
            frac = max(frac, (time.time() - start) / max(budget, 1.0))
            if frac >= 1:
                log(f"--max-minutes {args.max_minutes} reached after {step} steps")
                break
        lr = train.warmup_cosine(cfg["lr"], step, cfg["warmup"], frac)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = [rng.randrange(len(data)) for _ in range(cfg["batch"])]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        # Samples with a reference have one latent frame more: one forward per length.
        groups = {}
        for i in idx:
            groups.setdefault(data[i]["x0"].shape[1], []).append(i)
        for ids in groups.values():
            x0 = torch.stack([data[i]["x0"] for i in ids])
            obj = torch.stack([data[i]["obj"] for i in ids]).float()
            shp = torch.stack([data[i]["shp"] for i in ids]).float()
            ctrl = torch.stack([data[i]["control"] for i in ids])
            # Another drawing of a reference sample's object, where it has them: the reference
            # is latent frame 0 of the target and of the control's inactive channels.
            for k, i in enumerate(ids):
                refs = data[i].get("refs")
                if refs is None:
                    continue
                # refs[-1] is the drawing where the clip's object starts (ref_aligned's); the
                # others and the sample's own (j = len - 1 here) are drawn alike.
                j = len(refs) - 1
                if not (cfg["ref_aligned"] and rng.random() < cfg["ref_aligned"]):
                    j = rng.randrange(len(refs))
                    if j == len(refs) - 1:
                        continue
                x0[k, :, 0] = refs[j]
                ctrl[k, : refs.shape[1], 0] = refs[j]
            x0, obj, shp, ctrl = (t.to(dev) for t in (x0, obj, shp, ctrl))
            prompts = ["" if rng.random() < cfg["caption_dropout"]
                       else draw_caption(data[i]["caption"], rng) for i in ids]
            u = torch.rand(len(ids), generator=g)
            shift = shifts[torch.randint(len(shifts), (len(ids),), generator=g)]
            sigma = shift_sigma(u, shift).to(dev)
            noise = torch.randn(x0.shape, generator=g).to(dev)
            s = sigma.view(-1, 1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            with torch.no_grad(), autocast:
                emb = encode_text(tok, te, prompts, L)
            streams.clear()
            with autocast:
                pred = tr(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=emb,
                          control_hidden_states=ctrl, return_dict=False)[0]
            aux_err = aux_ref_err = None
            refd = [k for k, i in enumerate(ids) if data[i]["caption"][0] == "reference"
                    and sigma[k] >= cfg["aux_min_sigma"]]
            if cfg["aux_ref"] > 0 and refd:
                # The reference frame is latent frame 0: the first h·w/(ph·pw) tokens.
                _, ph, pw = tr.config.patch_size
                n_ref = (x0.shape[3] // ph) * (x0.shape[4] // pw)
                sel = torch.tensor(refd, device=dev)
                pooled = captured["ref_states"][sel, :n_ref].float().mean(dim=1)
                ys = torch.tensor([world.SHAPES.index(data[ids[k]]["caption"][1][1]) for k in refd],
                                  device=dev)
                lr_ = heads["ref_shape"](pooled)
                aux_ref_err = (sel, F.cross_entropy(lr_, ys, reduction="none"))
                per_task.setdefault("ref_shape_acc", []).extend(
                    (lr_.argmax(1) == ys).float().tolist())
            if cfg["aux"] > 0 and refd:
                # The last hint [B, tokens, dim] averaged over the video tokens the object covers
                # (its patches; the reference frame's tokens have none).
                sel = torch.tensor(refd, device=dev)
                hint = captured["hint"][sel].float()
                tok_w = object_tokens(obj[sel, 0], tr.config.patch_size)
                tok_w = tok_w / tok_w.sum(dim=1, keepdim=True).clamp(min=1.0)
                pooled = (hint * tok_w[:, :, None]).sum(dim=1)
                combos = [data[ids[k]]["caption"][1] for k in refd]
                ys = torch.tensor([world.SHAPES.index(c[1]) for c in combos], device=dev)
                yc = torch.tensor([list(world.COLOURS).index(c[0]) for c in combos], device=dev)
                ls, lc = heads["shape"](pooled), heads["colour"](pooled)
                aux_err = (sel, F.cross_entropy(ls, ys, reduction="none")
                           + F.cross_entropy(lc, yc, reduction="none"))
                per_task.setdefault("aux_shape_acc", []).extend(
                    (ls.argmax(1) == ys).float().tolist())
            wt = 1 + cfg["object_weight"] * obj + cfg["shape_weight"] * shp * (
                s <= cfg["shape_max_sigma"]).float()
            err = ((pred.float() - (noise - x0)).pow(2) * wt).mean(dim=(1, 2, 3, 4)) \
                / wt.mean(dim=(1, 2, 3, 4))
            err_fm = err.detach()
            # The teacher: the main model without the control (every hint scaled by 0) on the
            # video frames alone, given the full caption, for the reference samples whose caption
            # was not dropped; the reference frame (latent frame 0) has no teacher.
            taught = [k for k, (i, p) in enumerate(zip(ids, prompts))
                      if data[i]["caption"][0] == "reference" and p]
            if aux_err is not None:
                err = err.index_add(0, aux_err[0], cfg["aux"] * aux_err[1])
            if aux_ref_err is not None:
                err = err.index_add(0, aux_ref_err[0], cfg["aux_ref"] * aux_ref_err[1])
            if cfg["distill"] > 0 and taught:
                sel = torch.tensor(taught, device=dev)
                full = [world.caption(*data[ids[k]]["caption"][1], rng) for k in taught]
                student_streams = list(streams)
                streams.clear()
                with torch.no_grad(), autocast:
                    emb_t = encode_text(tok, te, full, L)
                    teach = teacher(hidden_states=xt[sel, :, 1:], timestep=sigma[sel] * 1000,
                               encoder_hidden_states=emb_t, control_hidden_states=ctrl[sel, :, 1:],
                               control_hidden_states_scale=torch.zeros(len(cfg["vace_layers"]),
                                                                       device=dev),
                               return_dict=False)[0].float()
                wv = wt[sel, :, 1:]
                err_d = ((pred[sel, :, 1:].float() - teach).pow(2) * wv).mean(dim=(1, 2, 3, 4)) \
                    / wv.mean(dim=(1, 2, 3, 4))
                err = err.index_add(0, sel, cfg["distill"] * err_d)
                if cfg["feature_distill"] > 0:
                    tw = 1 + 8 * object_tokens(obj[sel, 0, 1:], tr.config.patch_size)
                    err_f = 0.0
                    for st, tt in zip(student_streams, streams):
                        tt = tt.float()
                        sv = st[sel].float()[:, st.shape[1] - tt.shape[1]:]
                        e = ((sv - tt).pow(2).mean(dim=2) * tw).sum(dim=1) / tw.sum(dim=1)
                        err_f = err_f + e / tt.pow(2).mean(dim=(1, 2))
                    err = err.index_add(0, sel, cfg["feature_distill"] * err_f)
                    per_task.setdefault("features", []).extend(err_f.tolist())
                per_task.setdefault("distill", []).extend(err_d.tolist())
            loss = err.sum() / len(idx)
            loss.backward()
            total += loss.item()
            for i, e in zip(ids, err_fm.tolist()):
                per_task.setdefault(data[i]["task"], []).append(e)
        gnorm = float(torch.nn.utils.clip_grad_norm_(params + head_params, 1.0))
        gnorms.append(gnorm)
        opt.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for ps, pd in zip(params, ema_params):
                pd.lerp_(ps, 1 - decay)
        losses.append(total)
        record["steps_run"] = step + 1
        if step % 10 == 0 or step == cfg["steps"] - 1:
            el = time.time() - start
            tasks = " ".join(f"{k} {np.mean(v[-100:]):.3f}" for k, v in sorted(per_task.items()))
            log(f"step {step + 1}/{cfg['steps']} loss {np.mean(losses[-10:]):.4f} ({tasks}) "
                f"lr {lr:.2e} grad norm {np.median(gnorms[-10:]):.2f} (clipped to 1) "
                f"{el / (step + 1):.2f} s/step")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < cfg["steps"]:
            record["loss_last_100"] = float(np.mean(losses[-100:]))
            checkpoint(step + 1)
    record["train_seconds"] = round(time.time() - start, 1)
    record["total_seconds"] = round(time.time() - t0, 1)
    record["loss_last_100"] = float(np.mean(losses[-100:]))
    record["loss_per_task_last_100"] = {k: float(np.mean(v[-100:])) for k, v in per_task.items()}
    save(args.out, base, (tok, te, ema, vae, sched), record)


if __name__ == "__main__":
    main()
