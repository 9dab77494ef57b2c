"""Which part of the toy pool each retrieval mode brings back: rotation and background of the retrieved images.

The pool differs from the target in its nuisance factors (toy.world: any rotation against ±35°, five background
styles against plain / gradient). The world stores only each pool image's hidden true kind, so this diagnostic
replays the world's random stream for every retrieved pool image (the same seeded `rng(seed, "pool", i)` the
world drew it with) and records the background style and the rotation `render` drew. It reads the augmentation
manifests of a finished run and prints, per retrieval set, the background mix, the share of images inside the
target's rotation range and the median |rotation|, beside the pool's own figures. No method reads any of this.

    PYTHONPATH=src python benchmarks/retrieval_nuisance.py                      # make demo's results/toy
    PYTHONPATH=src python benchmarks/retrieval_nuisance.py --results results/x  # another toy run

The world's spec is the one the run's world recorded (world/classes.json.meta.json), not re-read from configs.

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from augbench.specs import WorldSpec, rng  # noqa: E402
from augbench.toy.world import POOL_BACKGROUNDS, render, world_kinds  # noqa: E402

TARGET_ROTATION = 35.0  # degrees: toy.world draws target objects in ±35°, pool objects in ±180°


class Recording(random.Random):
    """A Random that notes the first background style and the first rotation `render` draws from it."""

    def __init__(self, state: object) -> None:
        super().__init__()
        self.setstate(state)
        self.background: str | None = None
        self.rotation: float | None = None

    def choice(self, seq):  # type: ignore[no-untyped-def, override]
        out = super().choice(seq)
        if self.background is None and tuple(seq) == POOL_BACKGROUNDS:
            self.background = out
        return out

    def uniform(self, a: float, b: float) -> float:
        out = super().uniform(a, b)
        if self.rotation is None and (a, b) == (-180, 180):
            self.rotation = out
        return out


def replay(spec: WorldSpec, kinds: tuple, index: int) -> tuple[str, float, np.ndarray]:
    """(background style, |rotation| in degrees, pixels) of pool image `index`, as the world drew them."""
    r = Recording(rng(spec.seed, "pool", index).getstate())
    kind = kinds[r.randrange(len(kinds))]
    image, _ = render(kind.key, r, spec.resolution, pool=True)  # at the world's resolution: draws' ranges depend on it
    assert r.background is not None and r.rotation is not None
    return r.background, abs(r.rotation), np.asarray(image)


def summary(name: str, factors: list[tuple[str, float]]) -> str:
    backgrounds = Counter(b for b, _ in factors)
    angles = np.array([a for _, a in factors])
    mix = ", ".join(f"{b} {backgrounds[b] / len(factors):.2f}" for b in POOL_BACKGROUNDS)
    return (f"{name:28s} {len(factors):6d}  within ±{TARGET_ROTATION:.0f}°: {(angles <= TARGET_ROTATION).mean():.2f}"
            f"  median |rotation| {np.median(angles):5.1f}°  backgrounds: {mix}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=REPO / "results/toy")
    ap.add_argument("--pool-sample", type=int, default=2000, help="pool images replayed for the pool's own figures")
    ap.add_argument("--check", type=int, default=10, help="retrieved images per set compared with the world's files")
    args = ap.parse_args()
    recorded = json.loads((args.results / "world/classes.json.meta.json").read_text())["spec"]
    spec = WorldSpec(**{k: v for k, v in recorded.items() if k in WorldSpec.__dataclass_fields__})
    kinds = world_kinds(spec)
    sample = np.random.default_rng(0).choice(spec.pool_size, min(args.pool_sample, spec.pool_size), replace=False)
    print(summary("pool (random sample)", [replay(spec, kinds, int(i))[:2] for i in sample]))
    checked = 0
    for manifest in sorted(args.results.glob("augment/retrieval_*/manifest.parquet")):
        factors = []
        for n, key in enumerate(pd.read_parquet(manifest, columns=["key"])["key"]):
            background, rotation, pixels = replay(spec, kinds, int(key))
            if n < args.check:  # the replay must draw the very image the world wrote
                stored = args.results / "world/pool/images" / f"{key}.png"
                if not np.array_equal(pixels, np.asarray(Image.open(stored).convert("RGB"))):
                    raise SystemExit(f"{stored}: the replay draws another image than the world wrote")
                checked += 1
            factors.append((background, rotation))
        print(summary(manifest.parent.name, factors))
    print(f"replay checked on {checked} retrieved images: pixel-identical to the world's files")


if __name__ == "__main__":
    main()
