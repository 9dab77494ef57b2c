"""Photo-like test images: non-square JPEGs with structure (a smooth colour field in a class's palette, a few shapes,
sensor noise), so that two photos of one class differ as two real shots do while sharing the class's look."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PALETTES = [(0.8, 0.4, 0.3), (0.3, 0.6, 0.8), (0.5, 0.7, 0.3), (0.7, 0.7, 0.2), (0.6, 0.3, 0.7)]


def photo(seed: int, cls: int, size: tuple[int, int]) -> Image.Image:
    """A photo of class `cls` (its palette) at `size` (w, h), a pure function of the seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    hue = np.array(PALETTES[cls % len(PALETTES)])
    field = np.clip(hue + 0.35 * rng.normal(size=(3, 4, 3)), 0, 1)
    img = Image.fromarray((field * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, w * 3 // 4), rng.integers(0, h * 3 // 4)
        box = (x0, y0, x0 + rng.integers(w // 8, w // 3), y0 + rng.integers(h // 8, h // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
