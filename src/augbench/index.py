"""FAISS index over the pool embeddings, built from a factory string, with measured recall.

Row ids in the index are global positions in the concatenation of the shards' `img_emb/*.npy`
files, in the order given; `ids.parquet` maps them back to (shard, key, url, caption).
`index_infos.json` records the factory string, size, memory and recall@10 against exact search
on a sample of the pool, so an approximate index that loses neighbours is visible, not silent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from augbench.io import atomic_path, write_json, write_meta, write_parquet
from augbench.specs import IndexSpec, spec_dict

log = logging.getLogger(__name__)


def load_embeddings(emb_files: list[Path], meta_files: list[Path]) -> tuple[np.ndarray, pd.DataFrame]:
    """Concatenate shard embeddings (as float32) and their metadata, checking that rows match."""
    embs, metas = [], []
    for emb_file, meta_file in zip(emb_files, meta_files, strict=True):
        emb = np.load(emb_file, mmap_mode="r")
        meta = pd.read_parquet(meta_file)
        if len(emb) != len(meta):
            raise ValueError(f"{emb_file}: {len(emb)} embeddings but {meta_file} has {len(meta)} rows")
        embs.append(np.asarray(emb, dtype=np.float32))
        if "key" not in meta.columns:  # precomputed LAION metadata may lack img2dataset's key: name rows by part and row
            meta = meta.assign(key=[f"{Path(emb_file).stem}_{i:09d}" for i in range(len(meta))])
        for column in ("url", "caption"):
            if column not in meta.columns:
                raise ValueError(f"{meta_file}: no {column!r} column (clip-retrieval metadata needs url and caption)")
        metas.append(meta.assign(shard=Path(emb_file).stem))
    if not embs:
        raise ValueError("index: no embedding files given")
    return np.concatenate(embs), pd.concat(metas, ignore_index=True)


def build(vectors: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """Build (train if needed, then add) an index from `spec.factory` for inner-product search."""
    d = vectors.shape[1]
    metric = faiss.METRIC_INNER_PRODUCT if spec.metric == "ip" else faiss.METRIC_L2
    index = faiss.index_factory(d, spec.factory, metric)
    if not index.is_trained:
        rs = np.random.default_rng(spec.seed)
        sample = vectors if len(vectors) <= spec.train_size else vectors[rs.choice(len(vectors), spec.train_size, replace=False)]
        index.train(np.ascontiguousarray(sample))
    index.add(np.ascontiguousarray(vectors))
    set_nprobe(index, spec.nprobe)
    return index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set nprobe on an IVF index (no-op for other index types)."""
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except (RuntimeError, AttributeError):
        pass


def search(index: faiss.Index, queries: np.ndarray, k: int, refine: int = 1,
           vectors: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours; with `refine` > 1, ask for k*refine and re-rank them by exact inner product.

    Re-ranking from the stored embeddings (memory-mapped, so it costs k*refine row reads per
    query) recovers most of what product quantisation loses, without holding full vectors in RAM.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if refine <= 1 or vectors is None:
        return index.search(queries, k)
    _, cand = index.search(queries, min(k * refine, index.ntotal))
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for i, row in enumerate(cand):
        row = row[row >= 0]
        exact = vectors(row) @ queries[i]
        top = np.argsort(-exact, kind="stable")[:k]
        scores[i, : len(top)] = exact[top]
        ids[i, : len(top)] = row[top]
    return scores, ids


def recall_at_k(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int = 10, refine: int = 1) -> float:
    """Share of the exact top-k (brute-force inner product) that the search (with re-ranking) also returns."""
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors))
    _, truth = exact.search(queries, k)
    _, found = search(index, queries, k, refine, lambda ids: vectors[ids])
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found, strict=True))
    return hits / truth.size


def build_index(emb_files: list[Path], meta_files: list[Path], out_index: Path, out_ids: Path, out_infos: Path,
                spec: IndexSpec) -> dict[str, object]:
    """Build the pool index and write it, its id map and its infos atomically."""
    started = time.time()
    faiss.omp_set_num_threads(spec.threads)  # k-means and adding use them; the job asked the scheduler for this many
    vectors, meta = load_embeddings(emb_files, meta_files)
    index = build(vectors, spec)
    rs = np.random.default_rng(spec.seed)
    n_q = min(spec.recall_sample, len(vectors))
    queries = vectors[rs.choice(len(vectors), n_q, replace=False)]
    recall = recall_at_k(index, vectors, queries, k=min(10, len(vectors)), refine=spec.refine)
    with atomic_path(out_index) as tmp:
        faiss.write_index(index, str(tmp))
    write_parquet(out_ids, meta)
    infos = {"factory": spec.factory, "size": int(index.ntotal), "dim": int(vectors.shape[1]),
             "recall_at_10": recall, "recall_sample": n_q, "nprobe": spec.nprobe, "refine": spec.refine,
             "index_bytes": out_index.stat().st_size}
    write_json(out_infos, infos)
    write_meta(out_index, "index", spec_dict(spec), started, infos=infos)
    log.info("index: %s", infos)
    return infos
