"""The classifier's decode cache: each split and augmentation set decoded once into a uint8 array file.

A `decode` job (CPU) writes a folder: `images.npy` (N x S x S x 3 uint8, S = `train.load_size`), `labels.npy`,
`ranks.npy` (an augmentation set's per-class rank; -1 for a real split) and `stats.json` (skips by reason).
Geometry is torchvision's reference: the shorter side resized to S (bicubic), then the centre S x S square; the
classifier's RandomResizedCrop works on that square and evaluation centre-crops `input_size` from it (S 256 and
input 224: ImageNet's Resize(256) + CenterCrop(224)). An undecodable image keeps its row with label -1, so the
arrays stay aligned with their table; the training run leaves it out and counts it.

Training jobs memory-map the files (`np.load(mmap_mode="r")`): every seed and method reading the same split shares
one copy in the page cache, and no run holds the decoded set in its own memory.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from augbench.imaging import UndecodableImage, decode
from augbench.io import atomic_dir, write_json, write_meta
from augbench.shards import read_pointed

log = logging.getLogger(__name__)


def _write(items: Iterable[tuple[int, bytes | str]], n: int, labels: np.ndarray, ranks: np.ndarray, size: int, what: str,
           out: Path) -> dict[str, object]:
    """Decode (row, data) items into the folder `out` (atomically), one image at a time."""
    started = time.time()
    skipped: Counter[str] = Counter()
    labels = labels.astype(np.int64).copy()
    with atomic_dir(out) as tmp:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        for row, data in items:
            try:
                images[row] = decode(data, size, name=None if isinstance(data, str) else f"{what}:{row}", fit="crop")
            except UndecodableImage as exc:
                skipped[exc.reason] += 1
                labels[row] = -1
                log.warning("%s: skipping undecodable image %s", what, exc)
        images.flush()
        del images
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "ranks.npy", ranks.astype(np.int64))
        stats = {"images": n, "decoded": int((labels >= 0).sum()), "size": size, "skipped": int(sum(skipped.values())),
                 "skipped_by_reason": dict(sorted(skipped.items())), "source": what}
        write_json(tmp / "stats.json", stats)
    write_meta(out, "decode", {"size": size}, started, stats=stats)
    log.info("decode %s: %d images at %d px (%d skipped) in %.1fs", what, n, size, stats["skipped"], time.time() - started)
    return stats


def decode_split(table: Path, root: Path, size: int, out: Path) -> dict[str, object]:
    """A split table (path relative to `root`, label) into a decoded folder."""
    df = pd.read_parquet(table)
    items = ((i, str(Path(root) / p)) for i, p in enumerate(df["path"]))
    return _write(items, len(df), df["label"].to_numpy(), np.full(len(df), -1), size, str(table), out)


def decode_augment(manifest: Path, size: int, out: Path) -> dict[str, object]:
    """An augmentation set (a manifest with pointers) into a decoded folder; its ranks are kept for n_aug subsets."""
    df = pd.read_parquet(manifest)
    return _write(read_pointed(df, Path(manifest).parent), len(df), df["label"].to_numpy(), df["rank"].to_numpy(), size,
                  str(manifest), out)


def is_decoded(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "images.npy").exists()


def open_decoded(folder: Path, max_rank: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(memory-mapped images, the rows to use, their labels, stats): rows with a decoded image and, for an
    augmentation set, rank < `max_rank` (the first n_aug images per class)."""
    folder = Path(folder)
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy")
    ranks = np.load(folder / "ranks.npy")
    keep = labels >= 0
    if max_rank is not None:
        keep &= ranks < max_rank
    rows = np.flatnonzero(keep)
    stats = json.loads((folder / "stats.json").read_text())
    if max_rank is not None:  # skips of the images this run would have used
        stats = {**stats, "skipped": int(((labels < 0) & (ranks < max_rank)).sum())}
    return images, rows, labels[rows], stats


class Rows:
    """A virtual concatenation of row subsets of several arrays (memory maps): `take` gathers a batch, in order,
    copying only its rows."""

    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(rows) for _, rows in parts])
        shapes = {arr.shape[1:] for arr, _ in parts if len(arr)}
        if len(shapes) > 1:
            raise ValueError(f"decoded sets of different image sizes cannot be mixed: {sorted(shapes)}")
        self.shape = shapes.pop() if shapes else (0, 0, 3)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), *self.shape), dtype=np.uint8)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for p, (arr, rows) in enumerate(self.parts):
            mask = which == p
            if mask.any():
                src = rows[idx[mask] - self.offsets[p]]
                order = np.argsort(src, kind="stable")  # ascending reads: sequential on the memory map
                got = np.empty((len(src), *self.shape), dtype=np.uint8)
                got[order] = arr[src[order]]
                out[mask] = got
        return out

    def __getitem__(self, s: slice) -> np.ndarray:
        return self.take(np.arange(len(self))[s])
