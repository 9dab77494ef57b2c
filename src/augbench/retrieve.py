"""Nearest-neighbour retrieval per class, de-duplication, and the leak filter.

`image` mode queries with each training image of a class; `text` mode with the class prompts.
A class's candidates are ordered round-robin over its queries (every query's 1st neighbour, then
every 2nd, ...; ties by score), so each training image contributes its own neighbours as in the
paper. Then: same pool key -> once; near-duplicates among the kept (cosine >= dedup_threshold)
-> once; any candidate that copies a val or test image -> removed and counted, because a
retrieval result that leaks evaluation images is a wrong result. Copies are nominated by
embedding (cosine >= leak_threshold) or difference hash (distance <= leak_hash_distance) and
confirmed by pixels (see `_verify_leaks`). Finally capped at `n_aug` per class.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from augbench.imaging import decode
from augbench.index import search
from augbench.io import write_json, write_meta, write_parquet
from augbench.shards import iter_shard
from augbench.specs import RetrieveSpec, spec_dict

log = logging.getLogger(__name__)


class PoolVectors:
    """Random access to pool embedding rows by global id, over memory-mapped shard files."""

    def __init__(self, emb_files: list[Path]) -> None:
        self.arrays = [np.load(f, mmap_mode="r") for f in emb_files]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros((len(ids), self.arrays[0].shape[1]), np.float32)
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.arrays[s][ids[sel] - self.offsets[s]]
        return out


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between two arrays of int64 hashes."""
    x = np.bitwise_xor(a[:, None].astype(np.int64), b[None, :].astype(np.int64)).view(np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1)


def load_split(emb: Path, meta: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """A target split's embeddings and metadata."""
    e = np.load(emb).astype(np.float32)
    m = pd.read_parquet(meta)
    if len(e) != len(m):
        raise ValueError(f"{emb}: {len(e)} embeddings but {meta} has {len(m)} rows")
    return e, m


def class_queries(spec: RetrieveSpec, classes: dict, train_emb: np.ndarray, train_meta: pd.DataFrame,
                  model: str | Path | None) -> dict[int, tuple[np.ndarray, list[str]]]:
    """Per class label: (query vectors, query ids)."""
    names = classes.get("names", {})
    out: dict[int, tuple[np.ndarray, list[str]]] = {}
    if spec.mode == "image":
        for label in range(len(classes["classes"])):
            sel = (train_meta["label"] == label).to_numpy()
            out[label] = (train_emb[sel], list(train_meta.loc[sel, "path"].astype(str)))
        return out
    if model is None:
        raise ValueError("retrieve: text mode needs --model (the CLIP that embeds the prompts)")
    from augbench.embed import Clip

    clip = Clip(model)
    for label, cls in enumerate(classes["classes"]):
        prompts = [p.format(names.get(cls, cls)) for p in spec.prompts]
        out[label] = (clip.texts(prompts), prompts)
    return out


def _suspects(emb: np.ndarray, hashes: np.ndarray | None, eval_emb: np.ndarray, eval_hash: np.ndarray | None,
              spec: RetrieveSpec) -> list[np.ndarray]:
    """Per candidate, the eval images it may copy: cosine >= leak_threshold or hash distance <= leak_hash_distance.

    Only the `leak_match_candidates` closest eval images of each kind are kept for pixel verification.
    """
    out: list[np.ndarray] = [np.zeros(0, np.int64)] * len(emb)
    if not len(eval_emb):
        return out
    sims = emb @ eval_emb.T
    dist = _hamming(hashes, eval_hash) if hashes is not None else None
    m = spec.leak_match_candidates
    for i in range(len(emb)):
        by_cos = np.argsort(-sims[i])[:m]
        match = by_cos[sims[i, by_cos] >= spec.leak_threshold]
        if dist is not None:
            by_hash = np.argsort(dist[i], kind="stable")[:m]
            match = np.union1d(match, by_hash[dist[i, by_hash] <= spec.leak_hash_distance])
        out[i] = match
    return out


def _pixels(data: bytes | Path, size: int = 32) -> np.ndarray:
    return decode(data if isinstance(data, bytes) else str(data), size).astype(np.float32) / 255


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


def _verify_leaks(found: dict, eval_meta: pd.DataFrame, pool_shards: list[Path] | None, eval_root: Path | None,
                  spec: RetrieveSpec) -> set[str]:
    """Keys of candidates that really copy an eval image.

    Embeddings and hashes only nominate suspects: in a small embedding space, different images of
    one class reach cosine 0.99, and simple images share hashes. A suspect is a leak when its
    pixels match a nominated eval image (mean absolute difference <= leak_pixel_mad, over
    1-pixel shifts). Without the pool's pixels (a remote pool) every suspect counts as a leak.
    """
    suspects = {str(c["key"].iat[i]): (c["shard"].iat[i] if "shard" in c else None, m)
                for c, _, ms in found.values() for i, m in enumerate(ms) if len(m)}
    if not suspects:
        return set()
    if not pool_shards or eval_root is None:
        log.warning("retrieve: no pool shards to verify %d leak suspects by pixels; removing them all", len(suspects))
        return set(suspects)
    shard_files = {Path(p).stem: Path(p) for p in pool_shards}
    pixels: dict[str, np.ndarray] = {}
    for shard in sorted({s for s, _ in suspects.values() if s is not None} or shard_files):
        for sample in iter_shard(shard_files[shard]):
            if sample.key in suspects:
                pixels[sample.key] = _pixels(sample.image)
    eval_cache: dict[int, np.ndarray] = {}
    leaked = set()
    for key, (_, matches) in suspects.items():
        if key not in pixels:
            leaked.add(key)  # cannot check: err on the side of not leaking
            continue
        for j in matches:
            if j not in eval_cache:
                eval_cache[j] = _pixels(eval_root / str(eval_meta["path"].iat[j]))
            if pixel_distance(pixels[key], eval_cache[j]) <= spec.leak_pixel_mad:
                leaked.add(key)
                break
    log.info("retrieve: %d leak suspects, %d confirmed by pixels", len(suspects), len(leaked))
    return leaked


def retrieve(index_file: Path, ids_file: Path, emb_files: list[Path], classes_file: Path,
             train: tuple[Path, Path], evals: list[tuple[Path, Path]], out: Path, out_stats: Path,
             spec: RetrieveSpec, model: str | Path | None = None, pool_shards: list[Path] | None = None,
             eval_root: Path | None = None) -> dict[str, object]:
    """Retrieve, de-duplicate, leak-filter and cap neighbours for every class; write `neighbors.parquet`."""
    started = time.time()
    classes = json.loads(Path(classes_file).read_text())
    index = faiss.read_index(str(index_file))
    ids = pd.read_parquet(ids_file)
    if index.ntotal != len(ids):
        raise ValueError(f"{index_file}: index has {index.ntotal} vectors but {ids_file} lists {len(ids)}")
    vectors = PoolVectors(emb_files)
    train_emb, train_meta = load_split(*train)
    eval_parts = [load_split(*p) for p in evals]
    eval_emb = np.concatenate([e for e, _ in eval_parts]) if eval_parts else np.zeros((0, train_emb.shape[1]), np.float32)
    eval_hash = np.concatenate([m["dhash"].to_numpy() for _, m in eval_parts]) if eval_parts else np.zeros(0, np.int64)
    eval_meta_all = pd.concat([m for _, m in eval_parts], ignore_index=True) if eval_parts else pd.DataFrame()
    has_hash = "dhash" in ids.columns
    if not has_hash:
        log.warning("retrieve: %s has no dhash column; the leak filter uses embeddings only", ids_file)
    queries = class_queries(spec, classes, train_emb, train_meta, model)
    k = min(spec.k_per_query, index.ntotal)
    per_class: dict[str, dict[str, int]] = {}
    found: dict[int, tuple[pd.DataFrame, np.ndarray, list[np.ndarray]]] = {}
    for label, cls in enumerate(classes["classes"]):
        qv, qid = queries[label]
        if len(qv) == 0:
            raise ValueError(f"retrieve: class {cls!r} has no queries (no training images in {train[1]}?)")
        scores, hits = search(index, qv, k, spec.refine, vectors.__getitem__)
        cand = pd.DataFrame({"gid": hits.ravel(), "score": scores.ravel(),
                             "rank": np.tile(np.arange(k), len(qv)), "query": np.repeat(qid, k)})
        cand = cand[cand["gid"] >= 0].sort_values(["rank", "score"], ascending=[True, False], kind="stable")
        n_cand = len(cand)
        cand = cand.drop_duplicates("gid", keep="first")
        gids = cand["gid"].to_numpy()
        cand = cand.assign(key=ids["key"].to_numpy()[gids].astype(str), shard=ids["shard"].to_numpy()[gids]).drop_duplicates("key")
        emb = vectors[cand["gid"].to_numpy()]
        suspects = _suspects(emb, ids["dhash"].to_numpy()[cand["gid"].to_numpy()] if has_hash else None,
                             eval_emb, eval_hash if has_hash else None, spec)
        found[label] = (cand, emb, suspects)
        per_class[cls] = {"candidates": int(n_cand), "same_key_removed": int(n_cand - len(cand))}
    leaked_keys = _verify_leaks(found, eval_meta_all, pool_shards, eval_root, spec)
    rows: list[dict[str, object]] = []
    for label, cls in enumerate(classes["classes"]):
        cand, emb, _ = found[label]
        leaked = cand["key"].isin(leaked_keys).to_numpy()
        keep_idx: list[int] = []
        n_near_dup = 0
        for i in np.flatnonzero(~leaked):
            if len(keep_idx) >= spec.n_aug:
                break
            if keep_idx and float(np.max(emb[keep_idx] @ emb[i])) >= spec.dedup_threshold:
                n_near_dup += 1
                continue
            keep_idx.append(i)
        kept = cand.iloc[keep_idx]
        for r, (gid, score, query) in enumerate(zip(kept["gid"], kept["score"], kept["query"], strict=True)):
            rows.append({"class": cls, "label": label, "key": str(ids["key"].iat[gid]), "url": ids["url"].iat[gid],
                         "caption": ids["caption"].iat[gid], "shard": ids["shard"].iat[gid], "score": float(score),
                         "rank": r, "query": query})
        per_class[cls].update({"near_dup_removed": n_near_dup, "leaked_removed": int(leaked.sum()), "kept": len(keep_idx)})
        if len(keep_idx) < spec.n_aug:
            log.warning("retrieve: class %s: only %d of %d images after filtering; raise k_per_query", cls, len(keep_idx), spec.n_aug)
    table = pd.DataFrame(rows)
    write_parquet(out, table)
    stats = {"mode": spec.mode, "per_class": per_class,
             "leaked_removed": sum(v["leaked_removed"] for v in per_class.values()),
             "leaked_unique": len(leaked_keys),
             "near_dup_removed": sum(v["near_dup_removed"] for v in per_class.values()),
             "kept": len(table)}
    write_json(out_stats, stats)
    write_meta(out, "retrieve", spec_dict(spec), started, stats={k: v for k, v in stats.items() if k != "per_class"})
    log.info("retrieve: %s mode: kept %d, leaked removed %d, near-duplicates removed %d",
             spec.mode, stats["kept"], stats["leaked_removed"], stats["near_dup_removed"])
    return stats
