"""Queries per class, and the merge that turns the searched top-k lists into ranked candidates per class.

`image` mode queries with each training image of a class; `text` mode with the class prompts.
A class's candidates are ordered round-robin over its queries (every query's 1st neighbour, then
every 2nd, ...; ties by score), so each training image contributes its own neighbours as in the
paper. Then, in this order:

* the same pool item (part, row) reached by several queries of a class -> once;
* a pool item reached by several classes -> kept by the class where it scores highest, and counted;
* a candidate that copies a val or test image -> removed and counted, because a retrieval result
  that leaks evaluation images is a wrong result. Copies are nominated by one FAISS search of the
  candidates against the val + test embeddings (cosine >= leak_threshold) and, where the pool
  carries difference hashes, one binary FAISS search (distance <= leak_hash_distance); a nominee
  is confirmed by pixels (`copies.is_copy`, whatever the copy's crop, letterbox, mirror or JPEG quality) where the
  pool's images are local, and otherwise handed to fetch, which confirms it on the downloaded pixels;
* near-duplicates among a class's kept candidates (cosine >= dedup_threshold) -> once;
* capped at `n_aug × overfetch` per class (fetch keeps the first `n_aug` that download).

Candidates are processed in chunks of classes (`chunk_rows` candidates, 65,536 by default: their float32
vectors take 200 MB at 768-d; 262,144 took a merge job to 2.1 GB in benchmarks/retrieval_scale.py), so
memory follows the chunk, not the target dataset;
url and caption are read only for the rows kept (by part and row, from the parts' own metadata).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from augbench.copies import is_copy
from augbench.io import atomic_path, write_json, write_meta, write_parquet
from augbench.pool import PoolPart, gather, read_rows
from augbench.search import _knn, load_paired, merge_blocks
from augbench.shards import iter_shard
from augbench.specs import RetrieveSpec, spec_dict

log = logging.getLogger(__name__)


def make_queries(mode: str, classes_file: Path, out_vectors: Path, out_table: Path, prompts: tuple[str, ...] = (),
                 train: tuple[Path, Path] | None = None, model: str | Path | None = None) -> dict[str, int]:
    """Write one mode's queries: vectors (float32, unit rows) and a table (label, class, query)."""
    started = time.time()
    classes = json.loads(Path(classes_file).read_text())
    names = classes.get("names", {})
    if mode == "image":
        if train is None:
            raise ValueError("queries: image mode needs the training split's embeddings")
        emb, meta = load_paired(*train)
        table = pd.DataFrame({"label": meta["label"].astype(int), "query": meta["path"].astype(str)})
        vectors = emb
    elif mode == "text":
        if model is None:
            raise ValueError("queries: text mode needs --model (the CLIP that embeds the prompts)")
        from augbench.embed import Clip

        rows = [(label, p.format(names.get(cls, cls))) for label, cls in enumerate(classes["classes"]) for p in prompts]
        table = pd.DataFrame(rows, columns=["label", "query"])
        vectors = Clip(model).texts(list(table["query"])) if rows else np.zeros((0, 1), np.float32)
    else:
        raise ValueError(f"queries: mode must be image or text, got {mode!r}")
    table["class"] = [classes["classes"][i] for i in table["label"]]
    empty = sorted(set(classes["classes"]) - set(table["class"]))
    if empty:
        raise ValueError(f"queries: classes {empty[:5]} have no {mode} queries (no training images in {train[1] if train else ''}?)")
    with atomic_path(out_vectors) as tmp:
        np.save(tmp, np.ascontiguousarray(vectors, dtype=np.float32))
    write_parquet(out_table, table)
    stats = {"queries": len(table), "dim": int(vectors.shape[1])}
    write_meta(out_vectors, "queries", {"mode": mode, "prompts": list(prompts)}, started, stats=stats)
    return stats


def candidates(scores: np.ndarray, parts: np.ndarray, rows: np.ndarray, queries: pd.DataFrame) -> tuple[pd.DataFrame, Counter]:
    """Every (class, pool item) candidate in round-robin order, duplicates within a class removed, and cross-class
    duplicates resolved (the class where the item scores highest keeps it). Returns (table, removed per class by reason)."""
    nq, k = scores.shape
    cand = pd.DataFrame({
        "label": np.repeat(queries["label"].to_numpy(), k), "query": np.repeat(queries["query"].to_numpy(), k),
        "rank": np.tile(np.arange(k), nq), "score": scores.ravel(), "part": parts.ravel().astype(np.int64),
        "row": rows.ravel(),
    })
    cand = cand[cand["row"] >= 0]
    cand = cand.sort_values(["label", "rank", "score", "part", "row"], ascending=[True, True, False, True, True], kind="stable")
    removed: Counter = Counter()
    n_before = cand.groupby("label").size()
    best = cand.groupby(["label", "part", "row"], sort=False)["score"].transform("max")
    cand = cand.assign(best=best).drop_duplicates(["label", "part", "row"], keep="first")
    for label, n in (n_before - cand.groupby("label").size()).items():
        removed[("same_item_removed", int(label))] += int(n)
    # cross-class: the class where the item scores highest keeps it (ties: the lower label)
    winner = cand.sort_values(["best", "label"], ascending=[False, True], kind="stable").drop_duplicates(["part", "row"])
    win = pd.Series(winner["label"].to_numpy(), index=pd.MultiIndex.from_arrays([winner["part"], winner["row"]]))
    keep = win.reindex(pd.MultiIndex.from_arrays([cand["part"], cand["row"]])).to_numpy() == cand["label"].to_numpy()
    for label, n in cand.loc[~keep, "label"].value_counts().items():
        removed[("cross_class_removed", int(label))] += int(n)
    return cand[keep].drop(columns="best").reset_index(drop=True), removed


def _hamming_search(cand_hash: np.ndarray, eval_hash: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest eval hashes (Hamming) of each candidate hash: one binary FAISS search."""
    index = faiss.IndexBinaryFlat(64)
    index.add(np.ascontiguousarray(eval_hash.astype(">i8").view(np.uint8).reshape(-1, 8)))
    return index.search(np.ascontiguousarray(cand_hash.astype(">i8").view(np.uint8).reshape(-1, 8)), min(k, len(eval_hash)))


def _verify_leaks(suspects: dict[tuple[int, int], list[Path]], shards: list[Path], keys: dict[tuple[int, int], str],
                  spec: RetrieveSpec, cache: dict[Path, Image.Image]) -> set[tuple[int, int]]:
    """(part, row) of the suspects whose pixels (from the local pool shards, one per part) copy an eval image."""
    leaked: set[tuple[int, int]] = set()
    for part in sorted({p for p, _ in suspects}):
        wanted = {keys[item]: item for item in suspects if item[0] == part}
        found: set[tuple[int, int]] = set()
        for sample in iter_shard(shards[part]):
            item = wanted.get(sample.key)
            if item is not None:
                found.add(item)
                if is_copy(sample.image, suspects[item], spec.leak_pixel_mad, cache):
                    leaked.add(item)
        leaked |= set(wanted.values()) - found  # not in the shard: cannot check, so err on the side of not leaking
    return leaked


def _chunks(sizes: pd.Series, max_rows: int) -> list[list[int]]:
    """Groups of labels whose candidate counts add up to at most max_rows (a class alone may exceed it)."""
    out, cur, n = [], [], 0
    for label, size in sizes.items():
        if cur and n + size > max_rows:
            out.append(cur)
            cur, n = [], 0
        cur.append(int(label))
        n += int(size)
    if cur:
        out.append(cur)
    return out


class _LeakScreen:
    """The leak search of one chunk of candidates, run on the rows asked for (each row once): their vectors gathered
    from the pool, searched against val + test by embedding and by hash, and, for a local pool, confirmed on pixels."""

    def __init__(self, chunk: pd.DataFrame, parts: list[PoolPart], dim: int, eval_emb: np.ndarray, eval_hash: np.ndarray | None,
                 eval_paths: list[Path], spec: RetrieveSpec, shards: list[Path] | None, pixel_cache: dict, device: str) -> None:
        self.chunk, self.parts, self.eval_emb, self.eval_hash, self.eval_paths = chunk, parts, eval_emb, eval_hash, eval_paths
        self.spec, self.shards, self.pixel_cache, self.device = spec, shards, pixel_cache, device
        self.vec = np.zeros((len(chunk), dim), np.float32)  # rows are filled as they are screened (untouched pages cost nothing)
        self.done = np.zeros(len(chunk), bool)
        self.leaked = np.zeros(len(chunk), bool)
        self.suspect_paths: dict[int, list[Path]] = {}
        self.seconds = 0.0

    def __call__(self, rows: np.ndarray) -> None:
        rows = rows[~self.done[rows]]
        if not len(rows):
            return
        started = time.perf_counter()
        self._screen(rows)
        self.seconds += time.perf_counter() - started

    def _screen(self, rows: np.ndarray) -> None:
        self.done[rows] = True
        sub, spec = self.chunk.iloc[rows], self.spec
        self.vec[rows] = gather(self.parts, sub["part"].to_numpy(), sub["row"].to_numpy())
        found: dict[int, list[int]] = {}
        if len(self.eval_emb):
            m = min(spec.leak_match_candidates, len(self.eval_emb))
            d, j = _knn(np.ascontiguousarray(self.vec[rows]), self.eval_emb, m, self.device)
            for i, js in zip(*np.nonzero(d >= spec.leak_threshold), strict=True):
                found.setdefault(int(rows[i]), []).append(int(j[i, js]))
        meta = None
        if self.eval_hash is not None and len(self.eval_emb):
            meta = _chunk_meta(self.parts, sub, ("dhash",))
            d, j = _hamming_search(meta["dhash"].to_numpy(np.int64), self.eval_hash, spec.leak_match_candidates)
            for i, js in zip(*np.nonzero(d <= spec.leak_hash_distance), strict=True):
                found.setdefault(int(rows[i]), []).append(int(j[i, js]))
        for i, js in found.items():
            self.suspect_paths[i] = [self.eval_paths[x] for x in sorted(set(js))]
        if self.shards and found:
            meta = meta if meta is not None else _chunk_meta(self.parts, sub, ())
            at = {int(r): k for k, r in enumerate(rows)}
            items = {i: (int(self.chunk["part"].iat[i]), int(self.chunk["row"].iat[i])) for i in found}
            confirmed = _verify_leaks({items[i]: self.suspect_paths[i] for i in items}, self.shards,
                                      {items[i]: str(meta["key"].iat[at[i]]) for i in items}, spec, self.pixel_cache)
            for i, item in items.items():
                self.leaked[i] = item in confirmed
            log.info("merge: %d leak suspects, %d confirmed by pixels", len(items), sum(self.leaked[i] for i in items))


def leak_window(need: int) -> int:
    """Candidates of a class screened for leaks at a time: what it can keep plus a quarter (and 16) for the removals."""
    return math.ceil(need * 1.25) + 16


def pool_dim_of(parts: list[PoolPart]) -> int:
    """The pool's embedding width, from the first part's header."""
    from augbench.pool import part_shape

    return int(part_shape(parts[0])[1]) if parts else 1


def merge(blocks: list[Path], queries_table: Path, parts: list[PoolPart], classes_file: Path,
          evals: list[tuple[Path, Path]], out: Path, out_stats: Path, spec: RetrieveSpec,
          pool_shards: list[Path] | None = None, eval_root: Path | None = None, chunk_rows: int = 65536,
          device: str = "cpu") -> dict[str, object]:
    """The reduce job of one mode: ranked, de-duplicated, leak-filtered candidates per class -> neighbors.parquet.

    `device`: where the leak search runs (cuda: a matrix product on the GPU, as the search blocks; cpu: faiss.knn on
    the job's threads)."""
    started = time.time()
    classes = json.loads(Path(classes_file).read_text())["classes"]
    queries = pd.read_parquet(queries_table)
    scores, part_idx, rows = merge_blocks(blocks, spec.mode)
    if len(scores) != len(queries):
        raise ValueError(f"merge: the search blocks hold {len(scores)} queries but {queries_table} lists {len(queries)}")
    cand, removed = candidates(scores, part_idx, rows, queries)
    need = math.ceil(spec.n_aug * spec.overfetch)
    eval_parts = [load_paired(*p) for p in evals]
    eval_emb = np.concatenate([e for e, _ in eval_parts]) if eval_parts else np.zeros((0, 1), np.float32)
    eval_meta = pd.concat([m for _, m in eval_parts], ignore_index=True) if eval_parts else pd.DataFrame({"path": []})
    eval_paths = [(eval_root / p) if eval_root else Path(p) for p in eval_meta["path"].astype(str)]
    eval_emb = np.ascontiguousarray(eval_emb, dtype=np.float32)
    has_hash = bool(parts) and "dhash" in eval_meta.columns and all("dhash" in pq.ParquetFile(p.meta).schema_arrow.names for p in parts)
    local = bool(pool_shards)
    pixel_cache: dict[Path, Image.Image] = {}
    per_class: dict[str, dict[str, int]] = {c: {"candidates": 0, "same_item_removed": 0, "cross_class_removed": 0,
                                                 "leaked_removed": 0, "leak_suspects": 0, "near_dup_removed": 0, "kept": 0}
                                             for c in classes}
    for (reason, label), n in removed.items():
        per_class[classes[label]][reason] += n
    kept_frames = []
    sizes = cand.groupby("label").size()
    # the leak search looks only at what a class can keep: its first `window` candidates in rank order, and the next
    # window only for a class whose filters removed too many (about a third of the candidates at ImageNet-10 % scale)
    window = leak_window(need)
    dim = pool_dim_of(parts)
    screened_rows, leak_seconds = 0, 0.0
    for labels in _chunks(sizes, chunk_rows):
        chunk = cand[cand["label"].isin(labels)].reset_index(drop=True)
        lab = chunk["label"].to_numpy()
        screen = _LeakScreen(chunk, parts, dim, eval_emb, eval_meta["dhash"].to_numpy(np.int64) if has_hash else None,
                             eval_paths, spec, list(pool_shards) if local else None, pixel_cache, device)
        vec, done, leaked, suspect_paths = screen.vec, screen.done, screen.leaked, screen.suspect_paths
        by_label = {label: np.flatnonzero(lab == label) for label in labels}

        screen(np.concatenate([idx[:window] for idx in by_label.values()]) if by_label else np.zeros(0, np.int64))
        for label in labels:
            idx = by_label[label]
            stats = per_class[classes[label]]
            stats["candidates"] += len(idx)
            keep: list[int] = []
            for pos, i in enumerate(idx):
                if len(keep) >= need:
                    break
                if not done[i]:
                    screen(idx[pos:pos + window])
                if leaked[i]:
                    stats["leaked_removed"] += 1
                    continue
                if keep and float(np.max(vec[keep] @ vec[i])) >= spec.dedup_threshold:
                    stats["near_dup_removed"] += 1
                    continue
                keep.append(int(i))
            stats["kept"] = len(keep)
            stats["screened"] = int(done[idx].sum())
            stats["leak_suspects"] = 0 if local else sum(1 for i in keep if i in suspect_paths)
            sel = chunk.iloc[keep].copy()
            sel["leak_suspects"] = [[str(p) for p in suspect_paths.get(i, [])] if not local else [] for i in keep]
            kept_frames.append(sel)
            if len(keep) < need:
                log.warning("merge: class %s: only %d of %d candidates after filtering (searched k per query %d)",
                            classes[label], len(keep), need, scores.shape[1])
        screened_rows += int(done.sum())
        leak_seconds += screen.seconds
    table = pd.concat(kept_frames, ignore_index=True) if kept_frames else cand.head(0).assign(leak_suspects=[])
    meta = _chunk_meta(parts, table, ())
    table = table.assign(key=meta["key"].to_numpy(), url=meta["url"].to_numpy(), caption=meta["caption"].to_numpy())
    table["class"] = [classes[i] for i in table["label"]]
    table["part_name"] = [parts[i].name for i in table["part"]]
    table["rank"] = table.groupby("label").cumcount()
    table = table[["class", "label", "rank", "score", "query", "part", "part_name", "row", "key", "url", "caption", "leak_suspects"]]
    write_parquet(out, table)
    kept = table.groupby("label").size().reindex(range(len(classes)), fill_value=0)
    stats = {"mode": spec.mode, "need_per_class": need, "k_per_query": int(scores.shape[1]), "per_class": per_class,
             "kept": len(table), "kept_min": int(kept.min()) if len(kept) else 0, "screened": screened_rows,
             "leak_window": window,
             **{r: sum(v[r] for v in per_class.values()) for r in
                ("same_item_removed", "cross_class_removed", "leaked_removed", "leak_suspects", "near_dup_removed")}}
    write_json(out_stats, stats)
    log.info("merge: leak search took %.2fs", leak_seconds)
    write_meta(out, "retrieve", spec_dict(spec), started, stats={k: v for k, v in stats.items() if k != "per_class"})
    log.info("merge: %s mode: kept %d (min per class %d of %d), cross-class %d, leaked %d, suspects for fetch %d, near-dup %d",
             spec.mode, stats["kept"], stats["kept_min"], need, stats["cross_class_removed"], stats["leaked_removed"],
             stats["leak_suspects"], stats["near_dup_removed"])
    return stats


def _chunk_meta(parts: list[PoolPart], table: pd.DataFrame, extra: tuple[str, ...]) -> pd.DataFrame:
    """Metadata (key, url, caption, extra) of the table's (part, row) items, in the table's order."""
    frames = []
    for p in sorted(table["part"].unique()):
        sel = np.flatnonzero(table["part"].to_numpy() == p)
        m = read_rows(parts[int(p)], table["row"].to_numpy()[sel], extra)
        m.index = sel
        frames.append(m)
    out = pd.concat(frames).sort_index() if frames else pd.DataFrame(columns=["key", "url", "caption", *extra])
    return out.reset_index(drop=True)
