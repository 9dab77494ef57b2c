"""The FAISS ANN index over the pool, built in shards and searched memory-mapped.

* `train_index`: the quantizer (an IVF factory string) trained once on a sample of `train_size`
  rows drawn from the parts' memory-maps (each part contributes in proportion to its rows).
* `add_part`: one job per part adds that part's rows to an empty copy of the trained index, with
  global ids `part << 32 | row`, so a hit names its part and row without any id table.
* `merge_index`: the parts' inverted lists are merged on disk (faiss.contrib.ondisk); the merged
  index is read with its inverted lists memory-mapped.
* `search_index`: all queries of one mode, k × refine candidates re-ranked by exact inner product
  from the stored embeddings; written in the search blocks' format, so the merge step is shared
  with the exact search.
* `index_recall`: recall@10 of the index against exact search on a sample of the *real* queries
  (the target's training images and the class prompts, not the pool's own vectors), to
  `index_infos.json`, so an approximate index that loses neighbours is visible.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import faiss
import numpy as np

from augbench.io import atomic_path, write_json, write_meta
from augbench.pool import PoolPart, check_part, gather, iter_tiles
from augbench.search import QuerySet, TopK, load_paired, mode_k, search_parts, write_block
from augbench.specs import IndexSpec, spec_dict

log = logging.getLogger(__name__)

ROW_BITS = 32


def _metric(spec: IndexSpec) -> int:
    """Inner product, as the exact search: CLIP embeddings are compared by cosine and stored normalised."""
    return faiss.METRIC_INNER_PRODUCT


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set nprobe on an IVF index (no-op for other index types)."""
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except (RuntimeError, AttributeError):
        pass


def sample_rows(parts: list[PoolPart], n: int, seed: int) -> np.ndarray:
    """`n` rows drawn without replacement across the parts (proportionally), as float32."""
    sizes = np.array([check_part(p)[0] for p in parts])
    n = min(n, int(sizes.sum()))
    rs = np.random.default_rng(seed)
    flat = np.sort(rs.choice(int(sizes.sum()), n, replace=False))
    bounds = np.cumsum(np.concatenate([[0], sizes]))
    part_idx = np.searchsorted(bounds, flat, side="right") - 1
    return gather(parts, part_idx, flat - bounds[part_idx])


def train_index(parts: list[PoolPart], out: Path, spec: IndexSpec, threads: int = 1) -> dict[str, object]:
    """Train the index's quantizer on a sample of the pool and write the empty trained index."""
    started = time.time()
    faiss.omp_set_num_threads(threads)
    sample = sample_rows(parts, spec.train_size, spec.seed)
    index = faiss.index_factory(sample.shape[1], spec.factory, _metric(spec))
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        raise ValueError(f"index.factory {spec.factory!r}: the sharded index needs an IVF factory (e.g. IVF1024,PQ64x8)") from None
    if hasattr(ivf, "do_polysemous_training"):
        # polysemous codes (Hamming pre-filtering) are never used here, and training them took 99 % of an
        # IVF1024,PQ64x8 training on 3,500 vectors (90 s of 91 s)
        ivf.do_polysemous_training = False
    index.train(np.ascontiguousarray(sample))
    with atomic_path(out) as tmp:
        faiss.write_index(index, str(tmp))
    stats = {"trained_on": len(sample), "dim": int(sample.shape[1])}
    write_meta(out, "index_train", spec_dict(spec), started, stats=stats)
    return stats


def add_part(trained: Path, part: PoolPart, part_number: int, out: Path, tile_rows: int = 131072, threads: int = 1) -> int:
    """Add one part's rows (ids part << 32 | row) to a copy of the trained index; returns the rows added."""
    started = time.time()
    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(str(trained))
    rows, _ = check_part(part, index.d)
    for start, tile in iter_tiles(part, tile_rows):
        ids = (np.int64(part_number) << ROW_BITS) + np.arange(start, start + len(tile), dtype=np.int64)
        index.add_with_ids(tile, ids)
    with atomic_path(out) as tmp:
        faiss.write_index(index, str(tmp))
    write_meta(out, "index_add", {"part": part.name}, started, stats={"rows": rows})
    return rows


def merge_index(trained: Path, part_indexes: list[Path], out_index: Path, out_ivfdata: Path) -> int:
    """Merge the parts' inverted lists on disk into `out_ivfdata`; `out_index` refers to it (same folder)."""
    from faiss.contrib.ondisk import merge_ondisk

    started = time.time()
    index = faiss.read_index(str(trained))
    # the index file names its .ivfdata (read back from the same folder): merge straight into the final name;
    # a job killed here leaves an index file missing, which Snakemake reruns
    out_ivfdata.unlink(missing_ok=True)
    merge_ondisk(index, [str(p) for p in part_indexes], str(out_ivfdata))
    with atomic_path(out_index) as tmp:
        faiss.write_index(index, str(tmp))
    write_meta(out_index, "index_merge", {"parts": len(part_indexes)}, started, stats={"ntotal": int(index.ntotal)})
    return int(index.ntotal)


def read_index(path: Path, nprobe: int) -> faiss.Index:
    """The merged index with its inverted lists memory-mapped from the .ivfdata beside it."""
    index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    set_nprobe(index, nprobe)
    return index


def ann_search(index: faiss.Index, parts: list[PoolPart], queries: np.ndarray, k: int, refine: int) -> TopK:
    """k nearest pool rows per query: ask the index for k × refine, re-rank exactly from the stored embeddings."""
    top = TopK(len(queries), k)
    if not len(queries):
        return top
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k * max(refine, 1), index.ntotal))
    part_idx = np.where(ids >= 0, ids >> ROW_BITS, -1)
    rows = np.where(ids >= 0, ids & ((1 << ROW_BITS) - 1), -1)
    valid = ids >= 0
    vec = gather(parts, part_idx[valid], rows[valid])
    exact = np.full(ids.shape, -np.inf, np.float32)
    qi = np.nonzero(valid)[0]
    exact[valid] = np.einsum("ij,ij->i", vec, queries[qi])
    top.push(exact, part_idx.astype(np.int32), rows)
    return top


def search_index(index_file: Path, parts: list[PoolPart], query_files: dict[str, tuple[Path, Path]], out: Path,
                 spec: dict[str, float], nprobe: int, refine: int, threads: int = 1) -> dict[str, object]:
    """All queries of the given modes against the ANN index, written like a search block."""
    started = time.time()
    faiss.omp_set_num_threads(threads)
    index = read_index(index_file, nprobe)
    tops, ks = {}, {}
    for mode, (vec, table) in sorted(query_files.items()):
        v, t = load_paired(vec, table)
        ks[mode] = mode_k(t, int(spec["n_aug"]), float(spec["overfetch"]), float(spec["margin"]))
        tops[mode] = ann_search(index, parts, v, ks[mode], refine)
    write_block(out, tops, ks)
    write_meta(out, "index_search", spec, started, stats={"k": ks, "nprobe": nprobe, "refine": refine})
    return {"k": ks}


def index_recall(index_file: Path, parts: list[PoolPart], query_files: list[Path], out_infos: Path, spec: IndexSpec,
                 k: int = 10, tile_rows: int = 131072, threads: int = 1) -> dict[str, object]:
    """recall@k of the index (with its re-ranking) against exact search, on a sample of the real queries."""
    started = time.time()
    faiss.omp_set_num_threads(threads)
    queries = np.concatenate([np.load(f).astype(np.float32) for f in query_files])
    rs = np.random.default_rng(spec.seed)
    sample = queries[np.sort(rs.choice(len(queries), min(spec.recall_sample, len(queries)), replace=False))]
    exact = search_parts(parts, 0, [QuerySet("q", sample, k)], tile_rows)["q"].finish()
    index = read_index(index_file, spec.nprobe)
    t0 = time.perf_counter()
    found = ann_search(index, parts, sample, k, spec.refine).finish()
    per_query_ms = 1000 * (time.perf_counter() - t0) / max(len(sample), 1)
    truth = exact[1].astype(np.int64) << ROW_BITS | exact[2]
    got = found[1].astype(np.int64) << ROW_BITS | found[2]
    hits = sum(len(set(t[t >= 0]) & set(g[g >= 0])) for t, g in zip(truth, got, strict=True))
    recall = hits / max(int((exact[2] >= 0).sum()), 1)
    infos = {"factory": spec.factory, "size": int(index.ntotal), "dim": int(index.d), f"recall_at_{k}": recall,
             "recall_queries": len(sample), "recall_queries_are": "the target's real queries (training images, class prompts)",
             "nprobe": spec.nprobe, "refine": spec.refine, "ms_per_query": per_query_ms}
    write_json(out_infos, infos)
    write_meta(out_infos, "index_recall", spec_dict(spec), started, infos=infos)
    log.info("index: %s", infos)
    return infos
