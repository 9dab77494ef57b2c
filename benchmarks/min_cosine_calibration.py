"""Calibrate `fetch.min_cosine` for a CLIP model: how close is our embedding of a downloaded image to the pool's stored
one when the image is the same, and when it is another photo of the same class?

For every image of an ImageFolder tree (`--images`, one folder per class):
  * stored: the producer's embedding, the CLIP processor's own resize (shortest side, centre crop) on the original
    photo, as clip-retrieval computes LAION's and DataComp's embeddings;
  * ours: the photo as img2dataset stores it (`--resize-mode` border: letterboxed; center_crop; at `--size` px,
    JPEG quality 95), decoded and embedded the way fetch's content check does (letterbox trimmed);
  * same: cosine(stored, ours) of each image; different: cosine(stored of an image, ours of another image of its class).

Printed: quantiles of both, and the threshold halfway between the 0.5th percentile of `same` and the 99.5th of
`different`, with the share of each side it misclassifies. Run it with the model and data a run will use:

    PYTHONPATH=src python benchmarks/min_cosine_calibration.py --model openai-clip-vit-large-patch14-folder --images /data/imagenet/val
    PYTHONPATH=src python benchmarks/min_cosine_calibration.py --model models/toy/clip --images results/toy/world/target/test

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from augbench.copies import trim_borders  # noqa: E402
from augbench.embed import Clip  # noqa: E402
from augbench.imaging import open_rgb  # noqa: E402


def stored_by_img2dataset(img: Image.Image, size: int, mode: str) -> Image.Image:
    """img2dataset's resize (border: keep ratio, pad white to a square; center_crop: shorter side, centre square)."""
    w, h = img.size
    if mode == "border":
        s = size / max(w, h)
        img = ImageOps.pad(img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS), (size, size),
                           color=(255, 255, 255))
    else:
        img = ImageOps.fit(img, (size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return open_rgb(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True, help="an ImageFolder tree: one folder per class")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--resize-mode", choices=("border", "center_crop"), default="border")
    a = ap.parse_args()
    clip = Clip(a.model)
    same, different = [], []
    for folder in sorted(p for p in Path(a.images).iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))[: a.per_class]
        if len(files) < 2:
            continue
        originals = [open_rgb(f) for f in files]
        stored = clip.images(originals)
        ours = clip.images([trim_borders(stored_by_img2dataset(im, a.size, a.resize_mode), letterbox_only=True) for im in originals])
        cos = stored @ ours.T
        same += list(np.diag(cos))
        different += list(cos[~np.eye(len(files), dtype=bool)])
    same, different = np.array(same), np.array(different)
    q = (0.001, 0.01, 0.05, 0.5)
    print(f"{a.model}: {len(same)} images, {len(different)} different-image pairs of a class; img2dataset {a.resize_mode} "
          f"at {a.size} px, JPEG 95")
    print("  same image      " + "  ".join(f"q{x:g} {np.quantile(same, x):.4f}" for x in q) + f"  min {same.min():.4f}")
    print("  different image " + "  ".join(f"q{1 - x:g} {np.quantile(different, 1 - x):.4f}" for x in q)
          + f"  max {different.max():.4f}")
    lo, hi = np.quantile(same, 0.005), np.quantile(different, 0.995)
    t = (lo + hi) / 2
    print(f"  threshold halfway between same q0.005 ({lo:.4f}) and different q0.995 ({hi:.4f}): {t:.3f}; "
          f"same below it {np.mean(same < t):.4f}, different at or above it {np.mean(different >= t):.4f}")


if __name__ == "__main__":
    main()
