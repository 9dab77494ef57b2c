"""Is this pool image a copy of an evaluation image? Confirmation on pixels, whatever was done to the copy's geometry.

Embeddings and hashes only nominate suspects (in a small embedding space different images of one class reach
cosine 0.99, and simple images share hashes); a suspect is removed only when its pixels match an eval image. The web
copy of a photo rarely has the photo's geometry: img2dataset stores it centre-cropped or letterboxed to a square
(white borders), a site crops it to another aspect ratio (4:3 <-> 3:4) or a little (a 90 % centre crop), mirrors it,
re-encodes it at JPEG quality 50. So the check compares the two images under a small set of geometric hypotheses
that covers those cases and their combinations:

- uniform borders (a letterbox, any colour) are trimmed from the candidate, and the untrimmed image is kept too;
- a centre box of one image, at the other's aspect ratio (a crop to another aspect) or at the full frame (a squash),
  each at scale 1, 0.9 and 0.8 (a centre crop), is laid over the other image, in both directions;
- the candidate as it is and mirrored.

Each pair of regions is resized to `SIDE` x `SIDE` and compared by the mean absolute difference of pixels in [0, 1],
minimised over translations of up to one pixel; the smallest over the hypotheses is the distance. A pair is a copy at
distance <= `max_mad` (`retrieve.leak_pixel_mad`, `fetch.leak_pixel_mad`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from augbench.imaging import open_rgb

SIDE = 32  # the comparison grid: fine enough to tell two photos apart, coarse enough that JPEG noise averages out
SCALES = (1.0, 0.9, 0.8)


def pixel_distance(a: np.ndarray, b: np.ndarray, shift: int = 1) -> float:
    """Mean absolute pixel difference, minimised over translations of up to `shift` pixels."""
    best = float("inf")
    h, w = a.shape[:2]
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            aa = a[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
            bb = b[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            best = min(best, float(np.abs(aa - bb).mean()))
    return best


def trim_borders(img: Image.Image, tol: float = 0.06, most: float = 0.45, letterbox_only: bool = False) -> Image.Image:
    """The image without uniform border rows and columns (a letterbox or pillarbox of any colour).

    A row or column is border when it is within `tol` of the corner colour (mean absolute difference over its pixels,
    in [0, 1]); at most `most` of each dimension is trimmed from each side, so a plain image is never trimmed away.
    `letterbox_only`: trim only bars as img2dataset's border mode pads them: white (or black), on two opposite sides and
    centred (within 2 px and 2 %), so that a photo on a plain background (uniform on all four sides) or with uniform
    coloured bands keeps them.
    """
    a = np.asarray(img, dtype=np.float32) / 255
    h, w = a.shape[:2]
    if h < 4 or w < 4:
        return img
    corner = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    row_off = np.abs(a - corner).mean(axis=(1, 2))
    col_off = np.abs(a - corner).mean(axis=(0, 2))

    def run(values: np.ndarray, limit: int) -> int:
        n = 0
        while n < limit and values[n] <= tol:
            n += 1
        return n

    top, bottom = run(row_off, int(h * most)), run(row_off[::-1], int(h * most))
    left, right = run(col_off, int(w * most)), run(col_off[::-1], int(w * most))
    if top + bottom + left + right == 0:
        return img
    if letterbox_only:
        if min(float(np.abs(corner - 1).max()), float(np.abs(corner).max())) > 0.1:  # bars are white (img2dataset) or black
            return img
        rows, cols = top + bottom > 0, left + right > 0
        centred = (abs(top - bottom) <= max(2, 0.02 * h)) if rows else (abs(left - right) <= max(2, 0.02 * w))
        if rows == cols or not centred:
            return img
    return img.crop((left, top, w - right, h - bottom))


def _boxes(size: tuple[int, int], aspect: float) -> list[tuple[float, float, float, float]]:
    """Centre boxes of an image of `size` (w, h): the full frame and the largest box of `aspect` (w / h), each at SCALES."""
    w, h = size
    own = w / h
    if aspect < own:  # the other image is narrower: crop the width
        fit = (w * aspect / own, h)
    else:
        fit = (w, h * own / aspect)
    out = []
    for bw, bh in {(w, h), (round(fit[0], 3), round(fit[1], 3))}:
        for s in SCALES:
            cw, ch = bw * s, bh * s
            out.append(((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2))
    return out


def _grid(img: Image.Image, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """A region of the image on the SIDE x SIDE comparison grid (values in [0, 1])."""
    region = img.resize((SIDE, SIDE), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
    return np.asarray(region, dtype=np.float32) / 255


def copy_distance(candidate: Image.Image, original: Image.Image) -> float:
    """The smallest pixel distance between the two images over the geometric hypotheses (see the module's text)."""
    best = float("inf")
    views = [candidate]
    trimmed = trim_borders(candidate)
    if trimmed.size != candidate.size:
        views.append(trimmed)
    o_aspect = original.size[0] / original.size[1]
    for view in views:
        for mirrored in (False, True):
            c = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else view
            c_aspect = c.size[0] / c.size[1]
            whole_c = _grid(c)
            for box in _boxes(original.size, c_aspect):  # the candidate is (a crop of) the original
                best = min(best, pixel_distance(whole_c, _grid(original, box)))
            whole_o = _grid(original)
            for box in _boxes(c.size, o_aspect):  # the original is (a crop of) the candidate
                best = min(best, pixel_distance(_grid(c, box), whole_o))
    return best


def _load(data: bytes | Path | Image.Image) -> Image.Image:
    img = data if isinstance(data, Image.Image) else open_rgb(data if isinstance(data, bytes) else Path(data))
    if max(img.size) > 4 * 256:  # the comparison is at SIDE px: a smaller working copy keeps a big photo cheap
        img = img.copy()
        img.thumbnail((1024, 1024), Image.Resampling.BILINEAR)
    return img


def is_copy(image: bytes | Path | Image.Image, eval_paths: list[Path], max_mad: float,
            cache: dict[Path, Image.Image] | None = None) -> bool:
    """Whether an image's pixels match one of the nominated eval images under some geometry (distance <= max_mad)."""
    cache = {} if cache is None else cache
    candidate = _load(image)
    for p in eval_paths:
        if p not in cache:
            cache[p] = _load(p)
        if copy_distance(candidate, cache[p]) <= max_mad:
            return True
    return False
