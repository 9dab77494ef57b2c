"""Exact nearest-neighbour search as map-reduce over pool parts.

Map (`search_block`, one job per block of parts): load the queries (the target's training-image
embeddings for `image` mode, the class prompts' text embeddings for `text` mode: small), stream
each part in tiles through `faiss.knn` (or a matrix product on a usable GPU) and keep, per query,
the top k as (score, part, row). Reduce (`merge_blocks`): combine the blocks' top-k lists one
block at a time. A job's memory is one tile, the queries and the top-k buffers, whatever the
pool's size.

k is derived, never hand-set (`derive_k`): each class must end with `n_aug × overfetch`
candidates after de-duplication and filtering, and its queries share that need.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from augbench.io import atomic_path, write_meta
from augbench.pool import PoolPart, check_part, iter_tiles

log = logging.getLogger(__name__)


def derive_k(n_aug: int, overfetch: float, margin: float, queries_per_class: int) -> int:
    """Neighbours per query so that a class's queries together can yield `n_aug × overfetch × margin` candidates.

    Candidates are taken round-robin over a class's queries, so each query needs its share; `margin`
    covers what de-duplication, the leak filter and cross-class resolution remove.
    """
    need = math.ceil(n_aug * overfetch * margin)
    return max(1, math.ceil(need / max(1, queries_per_class)))


def mode_k(queries: pd.DataFrame, n_aug: int, overfetch: float, margin: float) -> int:
    """k for one query table (columns label, query): sized by the class with the fewest queries."""
    per_class = int(queries.groupby("label").size().min()) if len(queries) else 1
    return derive_k(n_aug, overfetch, margin, per_class)


class TopK:
    """Per-query running top-k of (score, part, row), merged tile by tile.

    Ties are broken by (part, row), so the result does not depend on how the pool was tiled.
    """

    def __init__(self, n_queries: int, k: int) -> None:
        self.k = k
        self.scores = np.full((n_queries, 0), -np.inf, np.float32)
        self.parts = np.zeros((n_queries, 0), np.int32)
        self.rows = np.zeros((n_queries, 0), np.int64)

    def push(self, scores: np.ndarray, parts: np.ndarray | int, rows: np.ndarray) -> None:
        """Merge a (n_queries, m) batch of candidates; ids < 0 (faiss's "none") are ignored."""
        parts = np.broadcast_to(np.asarray(parts, np.int32), rows.shape)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        s = np.concatenate([self.scores, scores], axis=1)
        p = np.concatenate([self.parts, parts], axis=1)
        r = np.concatenate([self.rows, rows.astype(np.int64)], axis=1)
        if s.shape[1] > self.k:
            # lexicographic: score descending, then part, then row ascending (stable under any tiling)
            order = np.lexsort((r, p, -s), axis=1)[:, : self.k] if s.shape[1] <= 4 * self.k else self._select(s, p, r)
            s, p, r = (np.take_along_axis(a, order, axis=1) for a in (s, p, r))
        self.scores, self.parts, self.rows = s, p, r

    def _select(self, s: np.ndarray, p: np.ndarray, r: np.ndarray) -> np.ndarray:
        # pre-select with argpartition (keeping every tie at the k-th score), then order exactly
        kth = np.partition(-s, self.k - 1, axis=1)[:, self.k - 1 : self.k]
        keep = -s <= kth
        width = int(keep.sum(axis=1).max())
        idx = np.argsort(~keep, axis=1, kind="stable")[:, :width]
        ss, pp, rr = (np.take_along_axis(a, idx, axis=1) for a in (s, p, r))
        sub = np.lexsort((rr, pp, -ss), axis=1)[:, : self.k]
        return np.take_along_axis(idx, sub, axis=1)

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, parts, rows), each (n_queries, k), best first; unfilled slots have row -1."""
        if self.scores.shape[1] < self.k:
            pad = self.k - self.scores.shape[1]
            self.push(np.full((len(self.scores), pad), -np.inf, np.float32), -1, np.full((len(self.scores), pad), -1, np.int64))
        order = np.lexsort((self.rows, self.parts, -self.scores), axis=1)
        s, p, r = (np.take_along_axis(a, order, axis=1) for a in (self.scores, self.parts, self.rows))
        r = np.where(np.isfinite(s), r, -1)
        return s, p, r


@dataclass
class QuerySet:
    """One query mode's vectors and its k."""

    mode: str
    vectors: np.ndarray
    k: int


def _knn(queries: np.ndarray, tile: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, len(tile))
    if device == "cuda":
        import torch

        q = torch.from_numpy(queries).to("cuda", torch.float16)
        t = torch.from_numpy(tile).to("cuda", torch.float16)
        scores, idx = [], []
        for i in range(0, len(q), 8192):
            top = (q[i:i + 8192] @ t.T).float().topk(k, dim=1)
            scores.append(top.values.cpu().numpy())
            idx.append(top.indices.cpu().numpy())
        return np.concatenate(scores), np.concatenate(idx).astype(np.int64)
    return faiss.knn(queries, tile, k, metric=faiss.METRIC_INNER_PRODUCT)


def search_parts(parts: list[PoolPart], first_part: int, queries: list[QuerySet], tile_rows: int,
                 device: str = "cpu") -> dict[str, TopK]:
    """Top-k of every query over the given parts (global part numbers start at `first_part`)."""
    dim = queries[0].vectors.shape[1] if queries else None
    tops = {q.mode: TopK(len(q.vectors), q.k) for q in queries}
    for i, part in enumerate(parts):
        rows, _ = check_part(part, dim)
        started = time.time()
        for start, tile in iter_tiles(part, tile_rows):
            for q in queries:
                if len(q.vectors):
                    d, idx = _knn(q.vectors, tile, q.k, device)
                    tops[q.mode].push(d, first_part + i, np.where(idx >= 0, idx + start, -1))
        log.info("search: part %s (%d rows) in %.1fs", part.name, rows, time.time() - started)
    return tops


def load_paired(vectors: Path, table: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """Vectors (as float32) and the table with one row per vector: a query mode's, or a target split's embeddings."""
    v = np.load(vectors).astype(np.float32)
    t = pd.read_parquet(table)
    if len(v) != len(t):
        raise ValueError(f"{vectors}: {len(v)} vectors but {table} has {len(t)} rows")
    return v, t


def write_block(out: Path, tops: dict[str, TopK], ks: dict[str, int]) -> None:
    """One block's per-query top-k, per mode, in one `.npz`."""
    arrays = {}
    for mode, top in tops.items():
        s, p, r = top.finish()
        arrays.update({f"{mode}_scores": s, f"{mode}_parts": p, f"{mode}_rows": r, f"{mode}_k": np.array(ks[mode])})
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def search_block(parts: list[PoolPart], first_part: int, query_files: dict[str, tuple[Path, Path]], out: Path,
                 spec: dict[str, float], device: str = "cpu") -> dict[str, object]:
    """The map job: search one block of parts with every query mode; `spec` holds n_aug, overfetch, margin, tile_rows."""
    started = time.time()
    sets, ks = [], {}
    for mode, (vec, table) in sorted(query_files.items()):
        v, t = load_paired(vec, table)
        ks[mode] = mode_k(t, int(spec["n_aug"]), float(spec["overfetch"]), float(spec["margin"]))
        sets.append(QuerySet(mode, v, ks[mode]))
    tops = search_parts(parts, first_part, sets, int(spec["tile_rows"]), device)
    write_block(out, tops, ks)
    stats = {"parts": [p.name for p in parts], "k": ks, "device": device}
    write_meta(out, "search", spec, started, stats=stats)
    return stats


def merge_blocks(blocks: list[Path], mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reduce step: combine the blocks' top-k of one mode, reading one block at a time."""
    top: TopK | None = None
    for b in blocks:
        with np.load(b) as z:
            if f"{mode}_scores" not in z:
                raise ValueError(f"{b}: no {mode!r} results (searched modes: {sorted(k[:-2] for k in z if k.endswith('_k'))})")
            s, p, r = z[f"{mode}_scores"], z[f"{mode}_parts"], z[f"{mode}_rows"]
            if top is None:
                top = TopK(len(s), int(z[f"{mode}_k"]))
            top.push(s, p, r)
    if top is None:
        raise ValueError("merge: no search blocks given")
    return top.finish()
