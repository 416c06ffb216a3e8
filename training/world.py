"""The kino-shapes world: one coloured shape moving in a straight line on a plain background.

Everything the model learns comes from here: clips are rendered on the fly from seeded random
scenes, and each scene gets a caption from a small grammar. `kino-eval.json` (written next to the
trained weights) carries this file's palette and the held-out combinations, so the Rust evaluator
(`kino eval`) measures against the same truth without copying constants.

Pixels are uint8 RGB, clips are `[frames, height, width, 3]`.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "orange": (245, 140, 30),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down")
DIRECTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Object size (circle diameter, square side, triangle base = height) and total travel, in pixels
# at 64×64; both scale with the frame. (Objects were 12–22 px until the VAE was found to round
# the corners of squares under ~16 px: read back as squares by `kino eval --video` after an
# encode-decode round trip, 1 of 6 at 12 px, 2 of 6 at 15 px, 6 of 6 at 18 px and up. The
# largest object plus the longest travel still fits the frame.)
SIZE_RANGE = (18, 26)
TRAVEL_RANGE = (12, 36)


def combinations():
    """Every valid (colour, shape, motion, background); an object never matches its background."""
    return [
        (c, s, m, b)
        for c, s, m, b in itertools.product(COLOURS, SHAPES, MOTIONS, BACKGROUNDS)
        if c != b
    ]


def held_out(count: int = 24, seed: int = 1234):
    """The combinations kept out of training, chosen so every colour, shape, motion and background
    still appears in training with the others."""
    rng = random.Random(seed)
    combos = combinations()
    while True:
        chosen = rng.sample(combos, count)
        rest = set(combos) - set(chosen)
        if all(any(v == r[i] for r in rest) for c in chosen for i, v in enumerate(c)):
            return sorted(chosen)


def canonical_prompt(colour, shape, motion, background):
    return f"a {colour} {shape} moving {motion} on a {background} background"


_SHAPE_WORDS = {
    "circle": ["circle", "circle", "ball", "disc", "dot"],
    "square": ["square", "square", "box", "block"],
    "triangle": ["triangle"],
}
_MOTION_WORDS = {
    "right": ["moving right", "moving to the right", "moves right", "going right",
              "slides to the right", "sliding right", "drifting right", "heading right",
              "travels right", "moving rightward"],
    "left": ["moving left", "moving to the left", "moves left", "going left",
             "slides to the left", "sliding left", "drifting left", "heading left",
             "travels left", "moving leftward"],
    "up": ["moving up", "moving upward", "moves up", "going up", "slides up", "rising",
           "drifting up", "heading up", "travels upward", "floating up"],
    "down": ["moving down", "moving downward", "moves down", "going down", "slides down",
             "falling", "drifting down", "heading down", "travels downward", "dropping down"],
}
_BG_WORDS = {"black": ["black"], "white": ["white"], "gray": ["gray", "gray", "grey"]}


def caption(colour, shape, motion, background, rng: random.Random) -> str:
    """A caption from the grammar: the canonical sentence half the time, a variant otherwise."""
    if rng.random() < 0.4:
        return canonical_prompt(colour, shape, motion, background)
    s = rng.choice(_SHAPE_WORDS[shape])
    m = rng.choice(_MOTION_WORDS[motion])
    b = rng.choice(_BG_WORDS[background])
    bg = rng.choice([f"on a {b} background", f"on {b}", f"against a {b} background",
                     f"over a {b} backdrop", f"with a {b} background", f"on a plain {b} background"])
    article = rng.choice(["a", "a", "the", "one"])
    template = rng.randrange(5)
    if template == 0:
        return f"{article} {colour} {s} {m} {bg}"
    if template == 1:
        return f"{colour} {s} {m}, {b} backdrop"
    if template == 2:
        return f"{b} background, {article} {colour} {s} {m}"
    if template == 3:
        return f"{article} {colour} {s} {m} {bg}."
    return f"{colour} {s}, {m}, {b} background"


def vocabulary():
    """Every word the grammar can produce (the tokenizer's vocabulary, besides special tokens)."""
    words = set()
    phrases = [canonical_prompt(*c) for c in combinations()]
    for w in itertools.chain(*_SHAPE_WORDS.values(), *_MOTION_WORDS.values(), *_BG_WORDS.values()):
        phrases.append(w)
    phrases += ["on a background on against over a backdrop with plain the one , ."]
    phrases += list(COLOURS) + list(BACKGROUNDS)
    for p in phrases:
        for w in p.replace(",", " , ").replace(".", " . ").split():
            words.add(w.lower())
    return sorted(words)


@dataclasses.dataclass
class Scene:
    colour: str
    shape: str
    motion: str
    background: str
    size: float  # pixels
    x0: float  # centre at frame 0, pixels
    y0: float
    travel: float  # pixels over the whole clip

    def centre(self, frame: float, frames: int) -> tuple[float, float]:
        """The object's centre at `frame` (may be fractional) of a `frames`-frame clip."""
        dx, dy = DIRECTION[self.motion]
        p = self.travel * frame / max(frames - 1, 1)
        return self.x0 + dx * p, self.y0 + dy * p


def sample_scene(combo, width: int, height: int, rng: random.Random, size_range=SIZE_RANGE,
                 travel_range=TRAVEL_RANGE) -> Scene:
    colour, shape, motion, background = combo
    scale = min(width, height) / 64
    size = rng.uniform(*size_range) * scale
    travel = rng.uniform(*travel_range) * scale
    dx, dy = DIRECTION[motion]
    half = size / 2 + 1
    # Start so that the object stays wholly inside the frame for the whole clip.
    def start(extent, d):
        lo, hi = half, extent - half
        if d > 0:
            hi -= travel
        elif d < 0:
            lo += travel
        return rng.uniform(lo, hi)
    return Scene(colour, shape, motion, background, size, start(width, dx), start(height, dy), travel)


_SS = 4  # supersampling per axis (anti-aliasing)


def _coverage(shape: str, cx: float, cy: float, size: float, width: int, height: int) -> np.ndarray:
    ys = (np.arange(height * _SS) + 0.5) / _SS
    xs = (np.arange(width * _SS) + 0.5) / _SS
    X, Y = np.meshgrid(xs, ys)
    r = size / 2
    if shape == "circle":
        inside = (X - cx) ** 2 + (Y - cy) ** 2 <= r * r
    elif shape == "square":
        inside = (np.abs(X - cx) <= r) & (np.abs(Y - cy) <= r)
    elif shape == "triangle":
        # Apex up at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r).
        t = (Y - (cy - r)) / size  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(X - cx) <= t * r)
    else:
        raise ValueError(shape)
    return inside.reshape(height, _SS, width, _SS).mean(axis=(1, 3))


def shape_difference(scene: Scene, width: int, height: int, frames: int) -> np.ndarray:
    """[frames, height, width] in [0, 1]: where the three shapes, drawn at this scene's size and
    positions, disagree (the most minus the least coverage of a pixel over `SHAPES`). These are
    the pixels that tell the shapes apart; the rest is the same whatever the shape."""
    out = np.empty((frames, height, width), np.float32)
    for f in range(frames):
        cov = [_coverage(s, *scene.centre(f, frames), scene.size, width, height) for s in SHAPES]
        out[f] = np.max(cov, axis=0) - np.min(cov, axis=0)
    return out


def render(scene: Scene, width: int, height: int, frames: int) -> np.ndarray:
    fg = np.array(COLOURS[scene.colour], np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for f in range(frames):
        a = _coverage(scene.shape, *scene.centre(f, frames), scene.size, width, height)
        out[f] = np.round(bg + a[..., None] * (fg - bg)).astype(np.uint8)
    return out


def _coverages_torch(cx, cy, size, width: int, height: int):
    """`_coverage` of all three `SHAPES` for many objects at once on a torch device: `cx`, `cy`,
    `size` float64 tensors [N]; gives float64 [3, N, height, width] in `SHAPES` order (the same
    arithmetic as the numpy version, so the same values)."""
    import torch

    dev = cx.device
    ys = (torch.arange(height * _SS, device=dev, dtype=torch.float64) + 0.5) / _SS
    xs = (torch.arange(width * _SS, device=dev, dtype=torch.float64) + 0.5) / _SS
    X, Y = xs.view(1, 1, -1), ys.view(1, -1, 1)
    cx, cy, r = cx.view(-1, 1, 1), cy.view(-1, 1, 1), (size / 2).view(-1, 1, 1)
    t = (Y - (cy - r)) / (2 * r)
    inside = torch.stack([
        (X - cx) ** 2 + (Y - cy) ** 2 <= r * r,                       # circle
        ((X - cx).abs() <= r) & ((Y - cy).abs() <= r),                # square
        (t >= 0) & (t <= 1) & ((X - cx).abs() <= t * r),              # triangle
    ])
    n = inside.shape[1]
    return inside.to(torch.float64).view(3, n, height, _SS, width, _SS).mean(dim=(3, 5))


def render_batch(scenes, width: int, height: int, frames: int, device, with_difference=False):
    """`render` (and `shape_difference`) of many scenes at once on a torch device, for training
    on a GPU where drawing clip by clip in numpy would starve it: uint8 [B, frames, height,
    width, 3] (and float32 [B, frames, height, width]), equal to the numpy functions'."""
    import torch

    pos = [s.centre(f, frames) for s in scenes for f in range(frames)]
    f64 = dict(device=device, dtype=torch.float64)
    cx = torch.tensor([p[0] for p in pos], **f64)
    cy = torch.tensor([p[1] for p in pos], **f64)
    size = torch.tensor([s.size for s in scenes for _ in range(frames)], **f64)
    cov = _coverages_torch(cx, cy, size, width, height)  # every shape, every object and frame
    kind = torch.tensor([SHAPES.index(s.shape) for s in scenes for _ in range(frames)],
                        device=device)
    a = cov.gather(0, kind.view(1, -1, 1, 1).expand(1, *cov.shape[1:]))[0]
    fg = torch.tensor([COLOURS[s.colour] for s in scenes], device=device, dtype=torch.float32)
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], device=device,
                      dtype=torch.float32)
    b = len(scenes)
    a = a.view(b, frames, height, width, 1)
    fg, bg = fg.view(b, 1, 1, 1, 3).double(), bg.view(b, 1, 1, 1, 3).double()
    clips = torch.round(bg + a * (fg - bg)).to(torch.uint8)
    if not with_difference:
        return clips
    diff = (cov.amax(0) - cov.amin(0)).to(torch.float32).view(b, frames, height, width)
    return clips, diff


class World:
    """Seeded stream of (clip, caption, combo) from the training combinations."""

    def __init__(self, width: int, height: int, frames: int, seed: int, exclude=(),
                 size_range=SIZE_RANGE, travel_range=TRAVEL_RANGE):
        self.width, self.height, self.frames = width, height, frames
        self.size_range, self.travel_range = size_range, travel_range
        exclude = set(map(tuple, exclude))
        self.combos = [c for c in combinations() if c not in exclude]
        self.rng = random.Random(seed)

    def sample(self):
        clip, _, caption_, combo = self.sample_with_scene()
        return clip, caption_, combo

    def sample_with_scene(self, render: bool = True):
        """(clip, scene, caption, combo): `sample` with the scene it drew; clip None unless
        `render` (draw many at once with `render_batch`: the same pixels)."""
        clip, scene, combo = self.sample_scene(render)
        return clip, scene, caption(*combo, self.rng), combo

    def sample_scene(self, draw: bool = True):
        combo = self.rng.choice(self.combos)
        scene = sample_scene(combo, self.width, self.height, self.rng, self.size_range,
                             self.travel_range)
        return (render(scene, self.width, self.height, self.frames) if draw else None), scene, combo

    def sample_batch(self, n: int, device, with_difference: bool = False):
        """`n` whole clips drawn as `sample` draws them, rendered together on `device`
        (`render_batch`): uint8 [n, frames, height, width, 3] (and their shape differences)."""
        scenes = []
        for _ in range(n):
            combo = self.rng.choice(self.combos)
            scenes.append(sample_scene(combo, self.width, self.height, self.rng, self.size_range,
                                       self.travel_range))
        return render_batch(scenes, self.width, self.height, self.frames, device, with_difference)

    def sample_crop(self, frames: int, size: int, with_difference: bool = False):
        """`frames` consecutive frames of a clip, cut to a `size`² window around the object
        (the VAE's second training phase: most pixels near the object, and cheap); with
        `with_difference`, also the same window of its `shape_difference`."""
        clip, scene, _ = self.sample_scene()
        f0 = self.rng.randrange(self.frames - frames + 1)
        cx, cy = scene.centre(f0 + (frames - 1) / 2, self.frames)
        cx += self.rng.uniform(-size / 4, size / 4)
        cy += self.rng.uniform(-size / 4, size / 4)
        x = int(np.clip(round(cx - size / 2), 0, self.width - size))
        y = int(np.clip(round(cy - size / 2), 0, self.height - size))
        window = (slice(f0, f0 + frames), slice(y, y + size), slice(x, x + size))
        if with_difference:
            return clip[window], shape_difference(scene, self.width, self.height, self.frames)[window]
        return clip[window]


def eval_spec(cases, size_range=SIZE_RANGE, travel_range=TRAVEL_RANGE):
    """The contents of `kino-eval.json`: palette, names, the object sizes and travel (where
    `kino eval --image` places its first images, as `sample_scene` does) and held-out cases."""
    return {
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()},
        "shapes": list(SHAPES),
        "motions": list(MOTIONS),
        "world": {"size_range": list(size_range), "travel_range": list(travel_range)},
        "cases": [
            {"prompt": canonical_prompt(*c), "colour": c[0], "shape": c[1], "motion": c[2],
             "background": c[3]}
            for c in cases
        ],
    }
