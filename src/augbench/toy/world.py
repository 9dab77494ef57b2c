"""The toy world: a rendered target dataset and a LAION-like captioned pool, from one seed.

Objects are filled shapes (the "kinds"); the first `n_classes` kinds are the target classes,
the rest are distractor concepts that only occur in the pool. Inside a class, colour, fill
texture, rotation, scale, position and background vary. The pool differs from the target in
distribution (wider poses, other backgrounds) and carries noisy captions: wrong labels, captions
without the object word, synonyms. The hidden true kind of each pool image is kept in
`pool.parquet` for diagnostics only (retrieval precision); no method may read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from augbench.io import atomic_path, write_json, write_meta, write_parquet
from augbench.specs import WorldSpec, rng, spec_dict

log = logging.getLogger(__name__)

SUPERSAMPLE = 4


@dataclass(frozen=True)
class Kind:
    """A shape concept: its key (safe for paths), caption nouns, and outline polygons."""

    key: str
    nouns: tuple[str, ...]


# First ten are the target classes by default; order is part of the world's definition.
KINDS: tuple[Kind, ...] = (
    Kind("circle", ("circle", "disc", "round dot")),
    Kind("square", ("square", "box", "block")),
    Kind("triangle", ("triangle", "trigon")),
    Kind("star", ("star", "starlet")),
    Kind("plus", ("plus sign", "cross", "plus")),
    Kind("ring", ("ring", "donut", "hoop")),
    Kind("heart", ("heart", "love heart")),
    Kind("crescent", ("crescent", "moon")),
    Kind("arrow", ("arrow", "pointer")),
    Kind("hourglass", ("hourglass", "bow tie")),
    Kind("hexagon", ("hexagon", "hex")),
    Kind("tee", ("letter t", "tee")),
    Kind("ell", ("letter l", "ell")),
    Kind("semicircle", ("semicircle", "half moon")),
    Kind("frame", ("frame", "hollow square")),
    Kind("ex", ("letter x", "saltire")),
    Kind("zigzag", ("zigzag", "lightning bolt")),
    Kind("trapezoid", ("trapezoid", "trapezium")),
    Kind("dots", ("three dots", "dots")),
    Kind("diamond", ("diamond", "rhombus")),
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "orange": (240, 140, 30),
    "purple": (140, 50, 180),
    "pink": (240, 120, 180),
    "cyan": (40, 200, 210),
    "brown": (130, 80, 40),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
}

ADJECTIVES = ("", "", "", "big ", "small ", "shiny ", "cute ", "vintage ", "modern ", "simple ")
PREFIXES = ("", "", "a photo of a ", "picture of a ", "stock image: ", "my ", "the ", "high quality ")
SUFFIXES = ("", "", " icon", " clipart", " on a textured background", " for sale", " 4k wallpaper", " design")
NO_OBJECT = (
    "img_{n}.jpg",
    "best design {n}",
    "free download",
    "beautiful {colour} pattern",
    "new collection {n}",
    "untitled",
    "wallpaper hd {n}",
    "{colour} abstract art",
)


def _polygon(kind: str) -> list[list[tuple[float, float]]]:
    """Outline polygons (unit coordinates, radius ~1) for a kind; holes drawn with background."""
    def circ(n: int, r: float = 1.0, cx: float = 0.0, cy: float = 0.0, a0: float = 0.0) -> list[tuple[float, float]]:
        return [(cx + r * math.cos(a0 + 2 * math.pi * i / n), cy + r * math.sin(a0 + 2 * math.pi * i / n)) for i in range(n)]

    if kind == "circle":
        return [circ(48)]
    if kind == "square":
        return [[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]]
    if kind == "triangle":
        return [circ(3, 1.0, 0, 0.15, -math.pi / 2)]
    if kind == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.42
            a = -math.pi / 2 + math.pi * i / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return [pts]
    if kind == "plus":
        w = 0.3
        return [[(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]]
    if kind == "ring":
        return [circ(48), circ(48, 0.55)]
    if kind == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17, -y / 17 - 0.1))
        return [pts]
    if kind == "crescent":
        return [circ(48), circ(48, 0.85, 0.45, -0.2)]
    if kind == "arrow":
        return [[(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)]]
    if kind == "hourglass":
        return [[(-0.8, -1), (0.8, -1), (0.1, 0), (0.8, 1), (-0.8, 1), (-0.1, 0)]]
    if kind == "hexagon":
        return [circ(6)]
    if kind == "tee":
        return [[(-1, -1), (1, -1), (1, -0.5), (0.25, -0.5), (0.25, 1), (-0.25, 1), (-0.25, -0.5), (-1, -0.5)]]
    if kind == "ell":
        return [[(-0.7, -1), (-0.2, -1), (-0.2, 0.5), (0.8, 0.5), (0.8, 1), (-0.7, 1)]]
    if kind == "semicircle":
        return [[(math.cos(math.pi * i / 24), -math.sin(math.pi * i / 24) + 0.4) for i in range(25)]]
    if kind == "frame":
        return [[(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)], [(-0.45, -0.45), (0.45, -0.45), (0.45, 0.45), (-0.45, 0.45)]]
    if kind == "ex":
        w = 0.3
        arm = [(-w, -1.2), (w, -1.2), (w, -w), (1.2, -w), (1.2, w), (w, w), (w, 1.2), (-w, 1.2), (-w, w), (-1.2, w), (-1.2, -w), (-w, -w)]
        c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)
        return [[(x * c - y * s, x * s + y * c) for x, y in arm]]
    if kind == "zigzag":
        return [[(-0.2, -1), (0.6, -1), (0.1, -0.1), (0.6, -0.1), (-0.4, 1), (-0.1, 0.15), (-0.6, 0.15)]]
    if kind == "trapezoid":
        return [[(-0.45, -0.6), (0.45, -0.6), (1, 0.6), (-1, 0.6)]]
    if kind == "dots":
        return [circ(24, 0.38, -0.5, 0.4), circ(24, 0.38, 0.5, 0.4), circ(24, 0.38, 0.0, -0.45)]
    if kind == "diamond":
        return [[(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]]
    raise KeyError(kind)


_HOLE_KINDS = {"ring", "crescent", "frame"}


def _background(r: random.Random, size: int, style: str) -> Image.Image:
    """A background image in one of several styles; pool and target use different mixes."""
    base = tuple(r.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    if style == "plain":
        pass
    elif style == "stripes":
        other = tuple(r.randint(0, 255) for _ in range(3))
        step = r.randint(size // 10, size // 4)
        for x in range(-size, 2 * size, step * 2):
            draw.polygon([(x, 0), (x + step, 0), (x + step + size, size), (x + size, size)], fill=other)
    elif style == "checker":
        other = tuple(r.randint(0, 255) for _ in range(3))
        step = r.randint(size // 8, size // 3)
        for i in range(0, size, step):
            for j in range(0, size, step):
                if (i // step + j // step) % 2:
                    draw.rectangle([i, j, i + step, j + step], fill=other)
    elif style == "gradient":
        other = np.array([r.randint(0, 255) for _ in range(3)], dtype=np.float32)
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        arr = (1 - t) * np.array(base, dtype=np.float32) + t * other
        img = Image.fromarray(np.broadcast_to(arr, (size, size, 3)).astype(np.uint8))
    elif style == "clutter":
        for _ in range(r.randint(3, 8)):
            col = tuple(r.randint(0, 255) for _ in range(3))
            x0, y0 = r.randint(0, size), r.randint(0, size)
            draw.line([(x0, y0), (r.randint(0, size), r.randint(0, size))], fill=col, width=r.randint(1, size // 16 + 1))
    else:
        raise ValueError(style)
    return img


TARGET_BACKGROUNDS = ("plain", "plain", "gradient")
POOL_BACKGROUNDS = ("plain", "gradient", "stripes", "checker", "clutter")


def render(kind: str, r: random.Random, resolution: int, pool: bool) -> tuple[Image.Image, str]:
    """Render one object of `kind` with random nuisance factors; returns (image, colour name)."""
    size = resolution * SUPERSAMPLE
    bg_style = r.choice(POOL_BACKGROUNDS if pool else TARGET_BACKGROUNDS)
    img = _background(r, size, bg_style)
    colour = r.choice(list(COLOURS))
    rgb = np.array(COLOURS[colour], dtype=np.float32) + np.array([r.gauss(0, 18) for _ in range(3)])
    fill = tuple(int(v) for v in np.clip(rgb, 0, 255))
    angle = math.radians(r.uniform(-180, 180) if pool else r.uniform(-35, 35))
    scale = r.uniform(0.28, 0.46) * size if not pool else r.uniform(0.22, 0.48) * size
    cx = size / 2 + r.uniform(-0.12, 0.12) * size
    cy = size / 2 + r.uniform(-0.12, 0.12) * size
    ca, sa = math.cos(angle), math.sin(angle)

    def place(poly: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(cx + scale * (x * ca - y * sa), cy + scale * (x * sa + y * ca)) for x, y in poly]

    mask = Image.new("L", (size, size), 0)
    mdraw = ImageDraw.Draw(mask)
    polys = _polygon(kind)
    if kind in _HOLE_KINDS:
        mdraw.polygon(place(polys[0]), fill=255)
        for hole in polys[1:]:
            mdraw.polygon(place(hole), fill=0)
    else:
        for poly in polys:
            mdraw.polygon(place(poly), fill=255)
    texture = r.choice(("solid", "solid", "stripes", "dots"))
    layer = Image.new("RGB", (size, size), fill)
    if texture != "solid":
        ldraw = ImageDraw.Draw(layer)
        other = tuple(int(v * 0.55) for v in fill)
        step = size // 8
        if texture == "stripes":
            for y in range(0, size, step):
                ldraw.rectangle([0, y, size, y + step // 2], fill=other)
        else:
            for y in range(0, size, step):
                for x in range(0, size, step):
                    ldraw.ellipse([x, y, x + step // 2, y + step // 2], fill=other)
    img.paste(layer, (0, 0), mask)
    img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return img, colour


def caption(kind: Kind, colour: str, r: random.Random, spec: WorldSpec, kinds: tuple[Kind, ...]) -> str:
    """A LAION-like caption: usually names the object (maybe by a synonym), sometimes wrongly or not at all."""
    u = r.random()
    if u < spec.p_no_object:
        return r.choice(NO_OBJECT).format(n=r.randint(1, 9999), colour=colour)
    named = kind
    if u < spec.p_no_object + spec.p_wrong_label:
        named = r.choice([k for k in kinds if k.key != kind.key])
    noun = r.choice(named.nouns)
    colour_word = f"{colour} " if r.random() < spec.p_colour_word else ""
    return f"{r.choice(PREFIXES)}{r.choice(ADJECTIVES)}{colour_word}{noun}{r.choice(SUFFIXES)}".strip()


def world_kinds(spec: WorldSpec) -> tuple[Kind, ...]:
    """The kinds in this world: target classes first, then distractors."""
    n = spec.n_classes + spec.n_distractors
    if n > len(KINDS):
        raise ValueError(f"world: n_classes + n_distractors = {n} exceeds the {len(KINDS)} kinds defined")
    return KINDS[:n]


def class_names(spec: WorldSpec) -> list[str]:
    """Target class keys, in label order."""
    return [k.key for k in world_kinds(spec)[: spec.n_classes]]


def build_world(spec: WorldSpec, out: Path) -> dict[str, int]:
    """Write the target splits (ImageFolder layout + `split.parquet`) and the pool (files + parquet).

    Layout under `out`:
      target/{split}/{class}/{index}.png, target/{split}.parquet (path, label, class);
        splits: train (the few shots), train_extra (as many again: the `real_x2` upper bound), val, test
      pool/images/{key}.png, pool/pool.parquet (key, file, caption, true_kind, true_label)
      classes.json
    """
    started = time.time()
    kinds = world_kinds(spec)
    targets = kinds[: spec.n_classes]
    counts: dict[str, int] = {}
    splits = (("train", spec.shots), ("train_extra", spec.shots), ("val", spec.val_per_class), ("test", spec.test_per_class))
    for split, n in splits:
        rows = []
        for label, kind in enumerate(targets):
            for i in range(n):
                r = rng(spec.seed, "target", split, kind.key, i)
                img, _ = render(kind.key, r, spec.resolution, pool=False)
                rel = f"target/{split}/{kind.key}/{i:05d}.png"
                with atomic_path(out / rel) as tmp:
                    img.save(tmp)
                rows.append({"path": rel, "label": label, "class": kind.key})
        write_parquet(out / f"target/{split}.parquet", pd.DataFrame(rows))
        counts[split] = len(rows)
    rows = []
    for i in range(spec.pool_size):
        r = rng(spec.seed, "pool", i)
        kind = kinds[r.randrange(len(kinds))]
        img, colour = render(kind.key, r, spec.resolution, pool=True)
        key = f"{i:09d}"
        rel = f"pool/images/{key}.png"
        with atomic_path(out / rel) as tmp:
            img.save(tmp)
        index = kinds.index(kind)
        label = index if index < spec.n_classes else -1
        rows.append({"key": key, "file": rel, "caption": caption(kind, colour, r, spec, kinds),
                     "true_kind": kind.key, "true_label": label})
    write_parquet(out / "pool/pool.parquet", pd.DataFrame(rows))
    counts["pool"] = len(rows)
    write_json(out / "classes.json", {"classes": [k.key for k in targets], "names": {k.key: k.nouns[0] for k in targets}})
    write_meta(out / "classes.json", "world", spec_dict(spec), started, counts=counts)
    log.info("world: wrote %s", counts)
    return counts


def judge_pool_tables(world: Path, train_per_class: int, heldout_per_class: int, out_train: Path,
                      out_heldout: Path) -> dict[str, int]:
    """The toy world's pool images of target kinds, labelled with their hidden true kind (never the caption), as two
    disjoint split tables (path relative to the world, label, class, key): the judge's extra training images and the
    held-out images its accuracy on pool-like images is measured on.

    A judge trained on the target's few studio shots alone never sees a pool image, and the generator learnt from
    the pool: it called generated images wrong that CLIP called right. Each class's images are ordered by a hash of
    their key, the first `heldout_per_class` held out and the next `train_per_class` trained on, so the split does
    not depend on the pool's order and a larger cap only adds images.
    """
    pool = pd.read_parquet(world / "pool/pool.parquet")
    classes = json.loads((world / "classes.json").read_text())["classes"]
    pool = pool[pool["true_label"] >= 0].copy()
    pool["order"] = [hashlib.sha256(f"judge:{k}".encode()).hexdigest() for k in pool["key"]]
    pool = pool.sort_values(["true_label", "order"])
    rank = pool.groupby("true_label").cumcount()

    def frame(rows: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"path": rows["file"].to_numpy(), "label": rows["true_label"].astype(np.int64).to_numpy(),
                             "class": [classes[i] for i in rows["true_label"]], "key": rows["key"].to_numpy()})

    heldout = pool[rank < heldout_per_class]
    train = pool[(rank >= heldout_per_class) & (rank < heldout_per_class + train_per_class)]
    write_parquet(out_train, frame(train))
    write_parquet(out_heldout, frame(heldout))
    held = heldout.groupby("true_label").size().reindex(range(len(classes)), fill_value=0)  # a class with none counts too
    short = sorted(classes[c] for c, n in held.items() if n < heldout_per_class)
    if short:
        log.warning("judge pool: classes with fewer than %d held-out pool images: %s", heldout_per_class, short)
    return {"train": len(train), "heldout": len(heldout)}
