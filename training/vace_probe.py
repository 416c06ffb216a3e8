"""Does a kino-shapes-vace model read a reference image's shape? A probe of its predictions.

For reference samples of the shapes world (the object alone on white as the reference, a caption
that names neither colour nor shape, as `kino eval --reference` asks), the model predicts the
flow at the same noisy latents twice: with the sample's own reference, and with a reference of
another shape (or another colour) drawn elsewhere. The mean square difference of the two
predictions over the latent cells of the video's object is how much the reference's shape (or
colour) moves the output. Beside it, the same for the teacher `train_vace.py --distill` uses: the
main model alone (every hint scaled by 0) given the full caption, once with the true shape (or
colour) and once with the other. A model that takes the shape from the reference moves about as
much as the teacher does; one that ignores it moves by nothing. The hints columns say where it
is lost: how much the hints the VACE blocks hand to the main blocks change with the reference.

    V/bin/python training/vace_probe.py --model models/kino-shapes-vace [--samples 40]

Found with it (stop 41, models/kino-shapes-vace/README.md): the branches trained so far move with
the reference's colour (less than the teacher does) and with its shape by 0.0006–0.01, against
the teacher's 0.14–0.21; their hints change with the reference's shape hardly more than with
the same object drawn elsewhere: the branch does not read the shape off the reference. With
`--aligned` references the hints do change with the shape, and the prediction still does not.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import sys

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train  # noqa: E402
import train_vace as tv  # noqa: E402
import world  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=pathlib.Path, required=True, help="a kino-shapes-vace folder")
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.95, 0.8, 0.5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aligned", action="store_true",
                    help="draw every reference centred where the clip's object starts (as "
                         "train_vace.py --ref-aligned does), not anywhere")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import AutoencoderKLWan, WanVACETransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    m = args.model
    tr = WanVACETransformer3DModel.from_pretrained(m / "transformer").eval()
    vae = AutoencoderKLWan.from_pretrained(m / "vae").eval()
    tok = AutoTokenizer.from_pretrained(m / "tokenizer")
    te = UMT5EncoderModel.from_pretrained(m / "text_encoder").eval()
    import json

    kino = json.loads((m / "kino.json").read_text())
    w, h, frames, L = kino["width"], kino["height"], kino["num_frames"], kino["max_sequence_length"]
    enc = tv.Encoder(vae)
    z = vae.config.z_dim
    off = torch.zeros(len(tr.config.vace_layers))
    rng = random.Random(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    combos = world.combinations()
    rows = {s: [] for s in args.sigmas}
    # The hints the VACE blocks hand to the main blocks, from the latest forward.
    hints = []
    for blk in tr.vace_blocks:
        blk.register_forward_hook(lambda _m, _i, out: hints.append(out[0]))

    def ref_latent(colour, shape, at):
        img = tv.reference_image(colour, shape, w, h, rng, at=at if args.aligned else None)
        return enc(train.to_tensor([img[None]]))[:, :, 0]

    with torch.no_grad():
        for _ in range(args.samples):
            c, s, mo, b = rng.choice(combos)
            scene = world.sample_scene((c, s, mo, b), w, h, rng)
            x = train.to_tensor([world.render(scene, w, h, frames)])
            x0 = enc(x)
            obj = train.latent_object_mask(x, vae).float()
            at = (scene.x0, scene.y0)
            img = tv.reference_image(c, s, w, h, rng, at=at if args.aligned else None)
            ctrl = tv.control_latents(enc, torch.zeros(1, 3, frames, h, w),
                                      torch.ones(1, 1, frames, h, w),
                                      train.to_tensor([img[None]])[:, :, 0])
            s2 = rng.choice([x for x in world.SHAPES if x != s])
            c2 = rng.choice([x for x in world.COLOURS if x not in (c, b, "white")])
            # "place": the same object drawn elsewhere (the teacher's caption unchanged), what
            # the other two changes also do besides their own.
            alt = {"shape": (c, s2), "colour": (c2, s), "place": (c, s)}
            vague = f"an object {tv._motion_bg(mo, b, rng)}"
            prompts = [vague, world.canonical_prompt(c, s, mo, b)] + [
                world.canonical_prompt(ac, ash, mo, b) for ac, ash in alt.values()]
            emb = train.encode_text(tok, te, prompts, L)
            for sig in args.sigmas:
                noise = torch.randn((1, z, 1 + x0.shape[2]) + x0.shape[3:], generator=g)
                xt = (1 - sig) * torch.cat([ctrl[:, :z, :1], x0], dim=2) + sig * noise
                t = torch.tensor([sig * 1000.0])

                def student(cl):
                    hints.clear()
                    return tr(hidden_states=xt, timestep=t, encoder_hidden_states=emb[:1],
                              control_hidden_states=cl, return_dict=False)[0][:, :, 1:]

                def teacher(e):
                    return tr(hidden_states=xt[:, :, 1:], timestep=t, encoder_hidden_states=e,
                              control_hidden_states=ctrl[:, :, 1:],
                              control_hidden_states_scale=off, return_dict=False)[0]

                def d(a, bb):
                    return float(((a - bb).pow(2) * obj).sum() / obj.sum() / z)

                own = student(ctrl)
                own_hints = [x.clone() for x in hints]
                t_own = teacher(emb[1:2])
                row = {}
                for k, (key, (ac, ash)) in enumerate(alt.items()):
                    cl = ctrl.clone()
                    cl[:, :z, 0] = ref_latent(ac, ash, at)[0]
                    row[f"model, {key}"] = d(own, student(cl))
                    # How much the hints themselves move (over their size), all tokens.
                    row[f"hints, {key}"] = float(sum((a - bb).pow(2).sum() for a, bb in
                                                     zip(own_hints, hints))
                                                 / sum(a.pow(2).sum() for a in own_hints))
                    row[f"teacher, {key}"] = d(t_own, teacher(emb[2 + k : 3 + k]))
                row["model vs teacher"] = d(own, t_own)
                rows[sig].append(row)
    keys = list(rows[args.sigmas[0]][0])
    print(f"{args.model}: {args.samples} reference samples"
          + (" (drawn where the clip's object starts)" if args.aligned else "") + "; mean square difference of the "
          "predictions over the object's latent cells when the reference's (teacher: the "
          "caption's) shape or colour changes")
    print("hints: the VACE blocks' hints' square change over their square, all tokens")
    print(f"{'sigma':>6} " + " ".join(f"{k:>17}" for k in keys))
    for sig, r in rows.items():
        print(f"{sig:>6} " + " ".join(f"{np.mean([x[k] for x in r]):>17.4f}" for k in keys))


if __name__ == "__main__":
    main()
