"""Reduce a Wan VAE's latent to its principal channels, and carry a transformer across.

Why: `training/candidates/vae2x` keeps squares square, but its latent has 16 channels at 2x
spatial resolution, so a 1x4x4 patch is 256 numbers, while kino-shapes' transformer (inner dim
128) sees and writes at most 128 of them per token. The other 128 directions of every patch are
never denoised: the sampler leaves the starting noise there (and training spends its loss on it:
r25's flow-matching loss stayed at 0.73 against the shipped model's 0.095). The data itself uses
few of those directions: per latent cell, 4 principal channels hold 98.3% of the variance and
decode squares as square as all 16 (`--check`).

So this script rewrites the VAE with `z_dim` k (4: a 1x4x4 patch is then 64 numbers, as with the
shipped VAE and patch 1x2x2), folding the projection into the layers around the latent:

- encoder: the new mean channels are `D^-1 U^T diag(1/std) (mu - m0)` (U, D: the top-k
  eigenvectors and square-rooted eigenvalues of the normalised latent's channel covariance over
  drawn clips, m0 the un-normalised centre), folded into `encoder.conv_out` (exact: a linear map
  of a convolution's output channels); `quant_conv` becomes the identity. The new latent is
  already normalised (latents_mean 0, latents_std 1) and white over the data.
- decoder: the old decoder's input `Wpq (m0 + G z) + bpq` (G = diag(std) U D) is folded into
  `decoder.conv_in`'s input channels and bias; `post_quant_conv` becomes the identity plus the
  least-squares part of the constant. (Exact inside the frame; where `conv_in` reads its zero
  padding, at the borders and the causal first frame, the constant's leftover differs: `--check`
  reports what the round trip loses.)
- `--transformer DIR`: a model folder trained on the old latent is rewritten for the new one
  (patch embedding through `U D` per cell, output projection through `D^-1 U^T`): the same
  function on the data's subspace, a start for training on the new VAE.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train  # noqa: E402
import world  # noqa: E402


def draw_latents(vae, clips: int, seed: int) -> torch.Tensor:
    """The normalised latent (as the pipelines use it) of `clips` drawn training clips."""
    cfg = train.CONFIG
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    wld = world.World(cfg["width"], cfg["height"], cfg["num_frames"], seed, (), **cfg["world"])
    out = []
    with torch.no_grad():
        for i in range(0, clips, 16):
            batch = [wld.sample_with_scene(render=False) for _ in range(min(16, clips - i))]
            x = world.render_batch([b[1] for b in batch], cfg["width"], cfg["height"],
                                   cfg["num_frames"], torch.device("cpu"))
            x = x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
            out.append((train.encode_mean(vae, x) - mean) / std)
    return torch.cat(out)


def round_trip(vae, clips, project=None):
    """Fill of each clip's round trip and the PSNR against the drawn clip."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    fills, psnr = [], []
    with torch.no_grad():
        for i in range(0, len(clips), 8):
            x = train.to_tensor(clips[i : i + 8])
            z = (train.encode_mean(vae, x) - mean) / std
            if project is not None:
                z = project(z)
            y = vae.decode(z * std + mean).sample.clamp(-1, 1)
            y = ((y + 1) * 127.5).round().permute(0, 2, 3, 4, 1).to(torch.uint8).numpy()
            for src, rt in zip(clips[i : i + 8], y):
                fills.append(train.soft_fill(rt))
                mse = np.mean((src.astype(np.float64) - rt.astype(np.float64)) ** 2)
                psnr.append(10 * np.log10(255.0**2 / max(mse, 1e-12)))
    return float(np.mean(fills)), float(np.min(fills)), float(np.mean(psnr))


def agreement(old, new, clips, project, U, D, cm) -> dict:
    """How exactly the reduced VAE does what the original does on the projected latent: the
    encoder's largest difference from `D^-1 U^T (zn - cm)`, the decoder's first layer's largest
    difference (relative) where it reads no zero padding, and the PSNR between the decodes."""
    mean = torch.tensor(old.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(old.config.latents_std).view(1, -1, 1, 1, 1)
    enc, first, se, n = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(clips), 8):
            x = train.to_tensor(clips[i : i + 8])
            zn = (train.encode_mean(old, x) - mean) / std
            want = ((zn.permute(0, 2, 3, 4, 1) - cm) @ U / D).permute(0, 4, 1, 2, 3)
            got = train.encode_mean(new, x)
            enc = max(enc, float((got - want).abs().max()))
            # The decoder's first layer on the same latent, where it reads no padding (from the
            # third latent frame on, one cell in from the border): exact there.
            projected = project(zn) * std + mean  # the old VAE's raw latent, projected
            a1 = old.decoder.conv_in(old.post_quant_conv(projected))
            b1 = new.decoder.conv_in(new.post_quant_conv(got))
            inner = (slice(None), slice(None), slice(2, None), slice(1, -1), slice(1, -1))
            first = max(first, float((a1[inner] - b1[inner]).abs().max() / a1.abs().max()))
            a = old.decode(projected).sample.clamp(-1, 1)
            b = new.decode(got).sample.clamp(-1, 1)
            se += float(((a - b) * 127.5).pow(2).sum())
            n += a.numel()
    return {"encoder_max_error": enc, "conv_in_interior_max_error": first,
            "decoder_agreement_db": 10 * float(np.log10(255.0**2 / max(se / n, 1e-12)))}


def reduce_vae(vae, k: int, cm, U, D):
    """The VAE with z_dim k whose latent z4 satisfies zn16 ~ cm + U D z4."""
    from diffusers import AutoencoderKLWan

    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float64)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float64)
    m0 = mean + std * cm  # raw centre
    A = torch.diag(1 / D) @ U.T @ torch.diag(1 / std)  # k x z: raw mu -> new latent
    G = torch.diag(std) @ U @ torch.diag(D)  # z x k: new latent -> raw mu (minus m0)
    sd = {n: p.detach().to(torch.float64) for n, p in vae.state_dict().items()}
    cfg = dict(vae.config)
    cfg.update(z_dim=k, latents_mean=[0.0] * k, latents_std=[1.0] * k)
    cfg = {n: v for n, v in cfg.items() if not n.startswith("_")}
    new = AutoencoderKLWan(**cfg)
    nsd = {n: p.detach().clone().to(torch.float64) for n, p in new.state_dict().items()}
    for n in nsd:
        if n in sd and sd[n].shape == nsd[n].shape:
            nsd[n] = sd[n].clone()
    # Encoder: conv_out (2z out channels) -> quant_conv (2z -> 2z); mu = its first z rows.
    wq = sd["quant_conv.weight"].reshape(2 * z, 2 * z)
    bq = sd["quant_conv.bias"]
    M = A @ wq[:z]  # k x 2z: conv_out channels -> new mu
    wc, bc = sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"]
    w_new = torch.zeros((2 * k,) + wc.shape[1:], dtype=torch.float64)
    b_new = torch.zeros(2 * k, dtype=torch.float64)
    w_new[:k] = torch.einsum("oj,j...->o...", M, wc)
    b_new[:k] = M @ bc + A @ (bq[:z] - m0)
    b_new[k:] = -9.0  # log-variance: a narrow posterior (the pipelines read the mean)
    nsd["encoder.conv_out.weight"], nsd["encoder.conv_out.bias"] = w_new, b_new
    nsd["quant_conv.weight"] = torch.eye(2 * k, dtype=torch.float64).reshape(2 * k, 2 * k, 1, 1, 1)
    nsd["quant_conv.bias"] = torch.zeros(2 * k, dtype=torch.float64)
    # Decoder: post_quant_conv (z -> z) -> conv_in (z in channels, 3x3x3, zero padding).
    wpq = sd["post_quant_conv.weight"].reshape(z, z)
    bpq = sd["post_quant_conv.bias"]
    P = wpq @ G  # z x k
    g = wpq @ m0 + bpq  # the constant the old conv_in saw everywhere the frame is
    h = torch.linalg.lstsq(P, g.unsqueeze(1)).solution.squeeze(1)  # carried through the padding
    r = g - P @ h  # leftover: folded into the bias (exact inside the frame only)
    wi, bi = sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"]
    nsd["decoder.conv_in.weight"] = torch.einsum("oc...,ck->ok...", wi, P)
    nsd["decoder.conv_in.bias"] = bi + torch.einsum("oc...,c->o", wi, r)
    nsd["post_quant_conv.weight"] = torch.eye(k, dtype=torch.float64).reshape(k, k, 1, 1, 1)
    nsd["post_quant_conv.bias"] = h
    new.load_state_dict({n: p.to(torch.float32) for n, p in nsd.items()})
    return new.eval(), float(r.norm() / g.norm())


def carry_transformer(src: pathlib.Path, out: pathlib.Path, vae_dir: pathlib.Path, k: int, cm,
                      U, D) -> None:
    """src's transformer rewritten for the reduced latent; the rest of the folder copied."""
    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, symlinks=False, ignore=shutil.ignore_patterns("vae"))
    shutil.copytree(vae_dir, out / "vae")
    tdir = out / "transformer"
    tcfg = json.loads((tdir / "config.json").read_text())
    z = tcfg["in_channels"]
    sd = load_file(tdir / "diffusion_pytorch_model.safetensors")
    UD = (U @ torch.diag(D)).to(torch.float64)  # z x k
    w = sd["patch_embedding.weight"].to(torch.float64)  # inner, z, pt, ph, pw
    b = sd["patch_embedding.bias"].to(torch.float64)
    sd["patch_embedding.weight"] = torch.einsum("oc...,ck->ok...", w, UD).float()
    sd["patch_embedding.bias"] = (b + torch.einsum("oc...,c->o", w, cm)).float()
    pt, ph, pw = tcfg["patch_size"]
    wo = sd["proj_out.weight"].to(torch.float64).reshape(pt * ph * pw, z, -1)
    bo = sd["proj_out.bias"].to(torch.float64).reshape(pt * ph * pw, z)
    Dinv_Ut = torch.diag(1 / D) @ U.T  # k x z
    sd["proj_out.weight"] = torch.einsum("kc,pci->pki", Dinv_Ut, wo).reshape(-1, wo.shape[-1]).float()
    sd["proj_out.bias"] = (torch.einsum("kc,pc->pk", Dinv_Ut, bo) + Dinv_Ut @ cm).reshape(-1).float()
    save_file({n: v.contiguous() for n, v in sd.items()}, tdir / "diffusion_pytorch_model.safetensors")
    tcfg["in_channels"] = tcfg["out_channels"] = k
    (tdir / "config.json").write_text(json.dumps(tcfg, indent=2) + "\n")


def leftover_noise(model: pathlib.Path, steps: int = 20, shift: float = 3.0) -> dict:
    """Sample `model` (a folder whose patch is more numbers than its transformer's inner dim)
    with plain Euler flow-matching steps, and compare the final latent's part outside the output
    projection's column space with the starting noise's: equal, because no step moves it."""
    from diffusers import WanPipeline
    from safetensors.torch import load_file

    pipe = WanPipeline.from_pretrained(model)
    emb, _ = pipe.encode_prompt("a red square moving right on a white background",
                                do_classifier_free_guidance=False,
                                max_sequence_length=train.CONFIG["max_sequence_length"])
    cfg = pipe.transformer.config
    pt, ph, pw = cfg.patch_size
    vs, vt = pipe.vae.config.scale_factor_spatial, pipe.vae.config.scale_factor_temporal
    c = train.CONFIG
    shape = (1, cfg.in_channels, (c["num_frames"] - 1) // vt + 1, c["height"] // vs, c["width"] // vs)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sig = torch.linspace(1, 0, steps + 1)
    sig = shift * sig / (1 + (shift - 1) * sig)
    x = noise.clone()
    with torch.no_grad():
        for i in range(steps):
            v = pipe.transformer(hidden_states=x, timestep=torch.tensor([sig[i] * 1000]),
                                 encoder_hidden_states=emb, return_dict=False)[0]
            x = x + (sig[i + 1] - sig[i]) * v
    w = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")["proj_out.weight"]
    q, _ = torch.linalg.qr(w.double())

    def outside(z):  # the patches (p_t, p_h, p_w, c order, as proj_out writes them), minus col(W)
        b, ch, t, h, wd = z.shape
        p = z.double().reshape(b, ch, t // pt, pt, h // ph, ph, wd // pw, pw)
        p = p.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(-1, pt * ph * pw * ch)
        return p - (p @ q) @ q.T

    o, n = outside(x), outside(noise)
    return {"patch_numbers": o.shape[1], "inner_dim": w.shape[1],
            "final_energy_outside": float(o.pow(2).sum(1).mean()),
            "noise_energy_outside": float(n.pow(2).sum(1).mean()),
            "largest_difference": float((o - n).abs().max())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae", type=pathlib.Path, help="the VAE folder to reduce")
    ap.add_argument("--channels", type=int, default=4, help="latent channels to keep (z_dim)")
    ap.add_argument("--out", type=pathlib.Path, help="folder for the reduced VAE")
    ap.add_argument("--leftover", type=pathlib.Path,
                    help="only measure the noise a model folder's sampling leaves undenoised")
    ap.add_argument("--clips", type=int, default=256, help="drawn clips for the statistics")
    ap.add_argument("--square-clips", type=int, default=32, help="drawn squares for the check")
    ap.add_argument("--transformer", type=pathlib.Path,
                    help="a model folder trained on --vae to rewrite for the reduced latent")
    ap.add_argument("--transformer-out", type=pathlib.Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.leftover:
        r = leftover_noise(args.leftover)
        print(f"{args.leftover}: patches of {r['patch_numbers']} numbers through inner dim "
              f"{r['inner_dim']}; energy per patch outside the output projection's span: final "
              f"latent {r['final_energy_outside']:.1f}, starting noise {r['noise_energy_outside']:.1f} "
              f"(largest difference {r['largest_difference']:.1e})")
        return
    if args.vae is None or args.out is None:
        ap.error("--vae and --out are needed (or --leftover MODEL)")
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(args.vae).eval()
    k = args.channels
    zn = draw_latents(vae, args.clips, seed=train.CONFIG["seed"] + 77).to(torch.float64)
    cells = zn.permute(0, 2, 3, 4, 1).reshape(-1, zn.shape[1])
    cm = cells.mean(0)
    ev, U = torch.linalg.eigh(torch.cov(cells.T))
    ev, U = ev.flip(0), U.flip(1)
    frac = (ev.cumsum(0) / ev.sum()).tolist()
    U, D = U[:, :k].contiguous(), ev[:k].sqrt()
    print(f"variance held by the top 1..{len(frac)} channels: "
          + " ".join(f"{f:.4f}" for f in frac), flush=True)

    new, leftover = reduce_vae(vae, k, cm, U, D)
    print(f"constant left to the bias (inexact at the padding): {leftover:.4f} of its norm")
    sq = train.square_clips(train.CONFIG, train.CONFIG["seed"], args.square_clips)
    Uf, Df, cmf = U.float(), D.float(), cm.float()

    def project(z):
        c = z.permute(0, 2, 3, 4, 1) - cmf
        return ((c @ Uf) @ Uf.T + cmf).permute(0, 4, 1, 2, 3)

    report = {"channels": k, "variance_held": frac[k - 1], "clips": args.clips,
              "constant_leftover": leftover, **agreement(vae, new, sq, project, Uf, Df, cmf)}
    print(f"encoder: largest difference from the projection {report['encoder_max_error']:.2e}; "
          f"decoder: first layer away from its padding {report['conv_in_interior_max_error']:.2e} "
          f"(relative), output {report['decoder_agreement_db']:.1f} dB against the original's "
          "decode of the projected latent", flush=True)
    for name, (v, p) in {"original": (vae, None), "original_projected": (vae, project),
                         "reduced": (new, None)}.items():
        f, fmin, psnr = round_trip(v, sq, p)
        report[name] = {"square_fill": round(f, 4), "square_fill_min": round(fmin, 4),
                        "psnr_db": round(psnr, 2)}
        print(f"{name:20s} square round-trip fill {f:.3f} (min {fmin:.3f}), PSNR {psnr:.2f} dB",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    new.save_pretrained(args.out / "vae", safe_serialization=True)
    report["source"] = str(args.vae)
    (args.out / "reduce.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out / 'vae'}")
    if args.transformer:
        out = args.transformer_out or args.transformer.with_name(args.transformer.name + f"-z{k}")
        carry_transformer(args.transformer, out, args.out / "vae", k, cm.to(torch.float64), U, D)
        print(f"saved {out}")


if __name__ == "__main__":
    main()
