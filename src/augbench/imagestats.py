"""Image statistics of an augmentation set, beside fidelity: how diverse its images are within a class, and how far they
lie from the class's real images, both in CLIP image-embedding space, so that accuracy can be read against quality
and diversity (a generator can be faithful to the class name and still give 500 copies of one picture).

- diversity: the mean pairwise cosine distance of a class's added images, 1 - mean_{i != j} x_i . x_j (unit
  vectors): 0 for copies of one image, about 1 for unrelated ones; averaged over classes.
- KID (kernel inception distance, Binkowski et al. 2018) on CLIP image features instead of Inception's: the unbiased
  squared MMD between a class's added and real images under the cubic polynomial kernel k(a, b) = (a . b / d + 1)^3;
  about 0 when they are drawn from one distribution; averaged over classes.

Both read the decode caches the classifier trains on (the added set and the real training split, the same geometry),
one class at a time: memory holds one class's embeddings, never the set's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from augbench.decoded import open_decoded
from augbench.io import write_json, write_meta

log = logging.getLogger(__name__)

BATCH = 256  # decoded images embedded at once


def diversity(x: np.ndarray) -> float:
    """Mean pairwise cosine distance of unit rows (nan below two rows), from their sum: O(n d), not O(n^2 d)."""
    n = len(x)
    if n < 2:
        return float("nan")
    s = x.astype(np.float64).sum(axis=0)
    return float(1.0 - (s @ s - n) / (n * (n - 1)))


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD of samples x [n, d] and y [m, d] under k(a, b) = (a . b / d + 1)^3 (nan below two each)."""
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        return float("nan")
    d = x.shape[1]
    x, y = x.astype(np.float64), y.astype(np.float64)
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def _embed(clip, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """CLIP embeddings of decoded rows, BATCH at a time."""
    out = [clip.images([Image.fromarray(np.asarray(a)) for a in images[rows[i:i + BATCH]]])
           for i in range(0, len(rows), BATCH)]
    return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)


def image_stats(augment: Path, real: Path, clip_model: str | Path, out: Path) -> dict[str, object]:
    """Diversity and KID to the real images, per class and averaged over classes, of a decoded augmentation set."""
    from augbench.embed import Clip

    started = time.time()
    images, rows, labels, _ = open_decoded(augment)
    real_images, real_rows, real_labels, _ = open_decoded(real)
    clip = Clip(clip_model)
    per_class: dict[str, dict[str, float]] = {}
    for c in np.unique(labels):
        added = _embed(clip, images, rows[labels == c])
        reals = _embed(clip, real_images, real_rows[real_labels == c])
        per_class[str(int(c))] = {"images": len(added), "real_images": len(reals), "diversity": diversity(added),
                                  "kid": kid(added, reals) if len(reals) else float("nan")}
    div = [v["diversity"] for v in per_class.values() if not np.isnan(v["diversity"])]
    kids = [v["kid"] for v in per_class.values() if not np.isnan(v["kid"])]
    result = {"diversity": float(np.mean(div)) if div else float("nan"), "kid": float(np.mean(kids)) if kids else float("nan"),
              "classes": len(per_class), "classes_without_kid": len(per_class) - len(kids), "per_class": per_class}
    write_json(out, result)
    write_meta(out, "image_stats", {}, started, clip=str(clip_model), stats={"images": len(rows)})
    log.info("image_stats %s: diversity %.3f, KID %.4f (%d classes)", augment, result["diversity"], result["kid"],
             len(per_class))
    return result
