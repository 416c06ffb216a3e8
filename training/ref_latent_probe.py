"""Is a reference image's shape readable from its VAE latent at all? A classifier probe.

Trains a small CNN (and, beside it, a linear classifier) to tell circle, square and triangle from
the reference latents of a `train_vace.py` data cache ([16, h, w] each: every reference sample's
own drawing and its `--ref-variants` drawings), holding out whole samples, and prints held-out
accuracy. Found with it (stop 42): the CNN reads 100% of held-out drawings, a linear classifier
about half, so the information is there for a VACE branch that learns to recognise it
(`train_vace.py --aux-ref`).

    V/bin/python training/ref_latent_probe.py --data-cache OUT/vace-data-r5.pt --ref-variants 15
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch
import torch.nn.functional as F

SHAPES = ["circle", "square", "triangle"]


def latents(cache: pathlib.Path, variants: int):
    data = torch.load(cache)["data"]
    refs = [d for d in data if d["caption"][0] == "reference"]
    extra = None
    if variants:
        extra = torch.load(cache.with_suffix(f".refs-{variants}.pt"))["refs"]
    xs, ys, groups = [], [], []
    for i, d in enumerate(refs):
        lat = d["x0"][:, 0][None]  # the reference is latent frame 0 of the target
        if extra is not None:
            lat = torch.cat([lat, extra[i]], 0)
        for one in lat:
            xs.append(one)
            ys.append(SHAPES.index(d["caption"][1][1]))
            groups.append(i)
    return torch.stack(xs).float(), torch.tensor(ys), torch.tensor(groups)


def fit(name, model, x, y, test, epochs):
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-4)
    xtr, ytr = x[~test], y[~test]
    t0 = time.time()
    for ep in range(epochs):
        perm = torch.randperm(len(xtr))
        for b in range(0, len(perm), 128):
            idx = perm[b : b + 128]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        train_acc = (model(xtr).argmax(1) == ytr).float().mean().item()
    print(f"{name}: held-out accuracy {acc:.3f} (train {train_acc:.3f}; {epochs} epochs, "
          f"{time.time() - t0:.0f} s)", flush=True)
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-cache", type=pathlib.Path, required=True,
                    help="a train_vace.py --data-cache file")
    ap.add_argument("--ref-variants", type=int, default=0,
                    help="also the CACHE.refs-K.pt drawings that train_vace.py --ref-variants K wrote")
    ap.add_argument("--held-out", type=float, default=0.15, help="share of samples held out")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y, groups = latents(args.data_cache, args.ref_variants)
    n = int(groups.max()) + 1
    test = groups >= n - max(1, round(args.held_out * n))
    print(f"{len(x)} reference latents {tuple(x.shape[1:])} of {n} samples, {int(test.sum())} "
          f"held out; classes {torch.bincount(y, minlength=3).tolist()} ({', '.join(SHAPES)})")
    c = x.shape[1]
    fit("linear", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 3)),
        x, y, test, args.epochs)
    fit("cnn", torch.nn.Sequential(
        torch.nn.Conv2d(c, 32, 3, padding=1), torch.nn.GELU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.GELU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.GELU(),
        torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 3)),
        x, y, test, args.epochs)


if __name__ == "__main__":
    main()
