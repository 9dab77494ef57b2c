"""Retrieval at two pool sizes: the workflow's own search, merge and index jobs, their peak memory and time.

A synthetic clustered 768-d fp16 pool is written in clip-retrieval's layout (img_emb/img_emb_N.npy +
metadata/metadata_N.parquet, parts of 250k rows); the queries are 1,000 classes x 32 image queries plus
1,000 text queries drawn from the pool's distribution (never pool vectors). For each size the script
runs the same `python -m augbench ...` commands the rules run, each as its own process, and prints its
peak RSS (the process's own maximum resident set, from wait4) and wall time; then the exact search's
throughput as a ratio to one `faiss.knn` call over the same 1M rows held in RAM, its recall against
brute force, and the ANN path's recall@10 on the real queries with its time per query. Last, the search block's cost
per pool row at two block sizes (`--block-parts`, parts per block; the same first parts of the pool, the two sizes run
interleaved `--block-repeats` times): what choosing `retrieve.parts_per_block` costs in time and memory.

    PYTHONPATH=src python benchmarks/retrieval_scale.py --work /tmp/augbench-bench            # 1M and 4M rows
    PYTHONPATH=src python benchmarks/retrieval_scale.py --work /tmp/b --sizes 250000 500000    # a quick look

It prints figures, asserts nothing: speed and memory targets live here, not in timed tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class World:
    """Clustered unit vectors of low intrinsic dimension (as CLIP embeddings are): class c's images lie around centre c."""

    def __init__(self, dim: int, n_centres: int, seed: int = 0, intrinsic: int = 32) -> None:
        rs = np.random.default_rng(seed)
        self.dim = dim
        self.centres = unit(rs.standard_normal((n_centres, dim)))
        self.basis = rs.standard_normal((intrinsic, dim)).astype(np.float32) / np.sqrt(intrinsic)

    def draw(self, centre_ids: np.ndarray, seed: int, spread: float = 0.6) -> np.ndarray:
        rs = np.random.default_rng(seed)
        z = rs.standard_normal((len(centre_ids), self.basis.shape[0])).astype(np.float32)
        noise = 0.05 * rs.standard_normal((len(centre_ids), self.dim)).astype(np.float32)
        return unit(self.centres[centre_ids] + spread * z @ self.basis + noise)


def write_pool(world: World, root: Path, n_parts: int, part_rows: int) -> None:
    """Parts 0..n_parts-1 under root (kept between runs: only missing parts are written)."""
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for i in range(n_parts):
        emb, meta = root / f"img_emb/img_emb_{i}.npy", root / f"metadata/metadata_{i}.parquet"
        if emb.exists() and meta.exists():
            continue
        ids = np.random.default_rng(1000 + i).integers(0, len(world.centres), part_rows)
        x = np.concatenate([world.draw(ids[j:j + 50000], 2000 * i + j) for j in range(0, part_rows, 50000)])
        np.save(emb, x.astype(np.float16))
        pd.DataFrame({"url": [f"http://pool.example/{i}/{r}.jpg" for r in range(part_rows)],
                      "caption": [f"image {r} of part {i}" for r in range(part_rows)], "similarity": 0.3}).to_parquet(meta)
        print(f"  wrote part {i} ({part_rows} rows)", flush=True)


def link_subset(full: Path, root: Path, n_parts: int) -> None:
    """A pool folder holding the first n_parts parts of `full` (symbolic links: no copy)."""
    for sub in ("img_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_parts):
        for sub, name in (("img_emb", f"img_emb_{i}.npy"), ("metadata", f"metadata_{i}.parquet")):
            link = root / sub / name
            if not link.exists():
                link.symlink_to(full / sub / name)


def write_queries(world: World, work: Path, n_classes: int, per_class: int) -> None:
    """Image queries (training images) and text queries (one per class), plus small val/test splits and classes.json."""
    labels = np.repeat(np.arange(n_classes), per_class)
    for mode, vec, table in (
        ("image", world.draw(labels, 7), pd.DataFrame({"label": labels, "query": [f"train/{c}/{i}.jpg" for c in range(n_classes)
                                                                                     for i in range(per_class)]})),
        ("text", world.draw(np.arange(n_classes), 8, spread=0.3),
         pd.DataFrame({"label": np.arange(n_classes), "query": [f"a photo of class {c}." for c in range(n_classes)]})),
    ):
        (work / mode).mkdir(parents=True, exist_ok=True)
        np.save(work / mode / "queries.npy", vec)
        table.assign(**{"class": [f"c{c}" for c in table["label"]]}).to_parquet(work / mode / "queries.parquet")
    for split, seed in (("val", 9), ("test", 10)):
        lab = np.repeat(np.arange(n_classes), 2)
        np.save(work / f"{split}.npy", world.draw(lab, seed).astype(np.float16))
        pd.DataFrame({"path": [f"{split}/{c}/{i}.jpg" for c in range(n_classes) for i in range(2)], "label": lab}).to_parquet(
            work / f"{split}.parquet")
    (work / "classes.json").write_text(json.dumps({"classes": [f"c{c}" for c in range(n_classes)], "names": {}}))


# Linux carries the parent's peak RSS over fork and exec into the child's getrusage/wait4 maxrss (this script holds
# over 1 GB when it starts a job), so each job reports its own address space's high-water mark, VmHWM, at exit.
_HWM = ("import atexit, runpy, sys\n"
        "_hwm_file = sys.argv.pop(1)\n"
        "def _hwm():\n"
        "    kb = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
        "    open(_hwm_file, 'w').write(kb)\n"
        "atexit.register(_hwm)\n")


def _with_hwm(cmd: list[str], hwm: Path) -> list[str]:
    """The same job, run so that its VmHWM (kB) lands in `hwm` when it exits."""
    if cmd[1] == "-m":
        return [cmd[0], "-c", _HWM + f"sys.argv = [{cmd[2]!r}] + sys.argv[1:]\nrunpy.run_module({cmd[2]!r}, run_name='__main__')",
                str(hwm), *cmd[3:]]
    return [cmd[0], "-c", _HWM + cmd[2], str(hwm)]


def run(cmd: list[str], label: str, rows: list[dict], threads: int) -> dict:
    """Run one job as its own process; its peak RSS is its own VmHWM."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS=str(threads))
    hwm = Path(os.environ.get("TMPDIR", "/tmp")) / f"augbench-bench-{os.getpid()}.hwm"
    cmd = _with_hwm(cmd, hwm)
    started = time.perf_counter()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"augbench-bench-{os.getpid()}.log"
    with open(log, "w") as err_file:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
        out = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
    err = log.read_text()
    wall = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"{label} failed:\n{err[-3000:]}")
    row = {"job": label, "peak_rss_mb": int(hwm.read_text()) / 1024, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}
    rows.append(row)
    row = {**row, "stdout": out}
    print(f"  {label:<34} peak RSS {row['peak_rss_mb']:8.0f} MB   wall {wall:8.1f} s", flush=True)
    return row


def pool_args(root: Path, first: int = 0, last: int | None = None) -> list[str]:
    from augbench.pool import list_parts

    parts = list_parts(root)[first:last]
    return ["--pool-emb", *[str(p.emb) for p in parts], "--pool-meta", *[str(p.meta) for p in parts],
            "--pool-names", *[p.name for p in parts], "--first-part", str(first)]


def exact_path(root: Path, work: Path, out: Path, n_parts: int, args: argparse.Namespace, rows: list[dict], tag: str) -> float:
    """The map jobs (one per block of parts) and the merge job of each mode; returns the summed search wall time."""
    out.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"n_aug": args.n_aug, "overfetch": args.overfetch, "margin": args.margin, "version": 1})
    blocks, search_wall = [], 0.0
    for b, first in enumerate(range(0, n_parts, args.parts_per_block)):
        blk = out / f"{b:05d}.npz"
        row = run([sys.executable, "-m", "augbench", "search", *pool_args(root, first, first + args.parts_per_block),
                   "--modes", "image", "text", "--queries", str(work / "image/queries.npy"), str(work / "text/queries.npy"),
                   "--tables", str(work / "image/queries.parquet"), str(work / "text/queries.parquet"),
                   "--tile-rows", str(args.tile_rows), "--out", str(blk), "--spec", spec], f"{tag} search block {b}", rows, args.threads)
        search_wall += row["wall_s"]
        blocks.append(str(blk))
    merge_jobs(root, work, out, blocks, args, rows, tag)
    return search_wall


def merge_jobs(root: Path, work: Path, out: Path, blocks: list[str], args: argparse.Namespace, rows: list[dict], tag: str) -> None:
    """The reduce job of each mode over the search blocks."""
    for mode in ("image", "text"):
        rspec = json.dumps({"mode": mode, "n_aug": args.n_aug, "overfetch": args.overfetch})
        run([sys.executable, "-m", "augbench", "retrieve", *pool_args(root), "--blocks", *blocks,
             "--table", str(work / mode / "queries.parquet"), "--classes", str(work / "classes.json"),
             "--eval-emb", str(work / "val.npy"), str(work / "test.npy"),
             "--eval-meta", str(work / "val.parquet"), str(work / "test.parquet"),
             "--out", str(out / f"{mode}.parquet"), "--out-stats", str(out / f"{mode}.json"), "--spec", rspec],
            f"{tag} merge {mode}", rows, args.threads)


def knn_baseline(root: Path, work: Path, n_parts: int, args: argparse.Namespace, rows: list[dict]) -> float:
    """One faiss.knn call per mode over the first n_parts parts held in RAM as float32; returns its wall time."""
    code = f"""
import json, time, numpy as np, pandas as pd, faiss, sys
sys.path.insert(0, {str(REPO / 'src')!r})
from augbench.search import mode_k
pool = np.concatenate([np.load({str(root)!r} + f'/img_emb/img_emb_{{i}}.npy').astype(np.float32) for i in range({n_parts})])
t = time.perf_counter(); out = {{}}
for mode in ('image', 'text'):
    q = np.load({str(work)!r} + f'/{{mode}}/queries.npy')
    k = mode_k(pd.read_parquet({str(work)!r} + f'/{{mode}}/queries.parquet'), {args.n_aug}, {args.overfetch}, {args.margin})
    d, i = faiss.knn(q, pool, k, metric=faiss.METRIC_INNER_PRODUCT)
    np.save({str(work)!r} + f'/knn_{{mode}}.npy', i)
print(json.dumps({{'search_s': time.perf_counter() - t}}))
"""
    row = run([sys.executable, "-c", code], "baseline faiss.knn (pool in RAM)", rows, args.threads)
    # the knn calls' own time (the pool already in RAM, imports done) against the search jobs' whole wall time
    return json.loads(row["stdout"].strip().splitlines()[-1])["search_s"]


def exact_recall(out: Path, work: Path, part_rows: int, sample: int = 200) -> float:
    """Share of the brute-force top-k (faiss.knn over the pool in RAM) that the sharded search also found."""
    from augbench.search import merge_blocks

    blocks = sorted(out.glob("*.npz"))
    hits = total = 0
    for mode in ("image", "text"):
        _, p, r = merge_blocks(blocks, mode)
        truth = np.load(work / f"knn_{mode}.npy")
        idx = np.random.default_rng(0).choice(len(truth), min(sample, len(truth)), replace=False)
        got = p[idx].astype(np.int64) * part_rows + r[idx]
        for t, g in zip(truth[idx], got, strict=True):
            hits += len(set(t) & set(g))
            total += len(t)
    return hits / total


def ann_path(root: Path, work: Path, out: Path, n_parts: int, args: argparse.Namespace, rows: list[dict], tag: str) -> dict:
    """index-train, one index-add per part, index-merge, index-recall on a sample of the real queries."""
    out.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"factory": args.factory, "nprobe": args.nprobe, "refine": args.refine, "train_size": args.train_size,
                       "recall_sample": args.ann_queries})
    run([sys.executable, "-m", "augbench", "index-train", *pool_args(root), "--out", str(out / "trained.index"), "--spec", spec,
         "--threads", str(args.threads)], f"{tag} index-train", rows, args.threads)
    shards = []
    for i in range(n_parts):
        shards.append(str(out / f"part{i}.index"))
        run([sys.executable, "-m", "augbench", "index-add", *pool_args(root, i, i + 1), "--trained", str(out / "trained.index"),
             "--out", shards[-1], "--threads", str(args.threads)], f"{tag} index-add part {i}", rows, args.threads)
    run([sys.executable, "-m", "augbench", "index-merge", "--trained", str(out / "trained.index"), "--parts", *shards,
         "--out-index", str(out / "pool.index"), "--out-ivfdata", str(out / "pool.ivfdata")], f"{tag} index-merge", rows, args.threads)
    run([sys.executable, "-m", "augbench", "index-recall", "--index", str(out / "pool.index"), *pool_args(root),
         "--queries", str(work / "image/queries.npy"), str(work / "text/queries.npy"), "--out", str(out / "index_infos.json"),
         "--spec", spec, "--threads", str(args.threads)], f"{tag} index-recall", rows, args.threads)
    return json.loads((out / "index_infos.json").read_text())


def block_sizes(work: Path, args: argparse.Namespace, rows: list[dict]) -> dict[str, dict[str, float]]:
    """One search block of each size in `--block-parts` over the pool's first parts, interleaved: wall seconds per
    million pool rows (median of the repeats) and peak RSS, so the block size is chosen from a measurement."""
    small, large = args.block_parts
    root = work / f"pool_blocks_{large}"
    link_subset(work / "pool_full", root, large)
    spec = json.dumps({"n_aug": args.n_aug, "overfetch": args.overfetch, "margin": args.margin, "version": 1})
    times: dict[int, list[float]] = {small: [], large: []}
    peaks: dict[int, float] = {}
    print(f"search block cost per pool row, blocks of {small} and {large} parts of {args.part_rows} rows:", flush=True)
    for rep in range(args.block_repeats):
        for parts in (small, large):
            row = run([sys.executable, "-m", "augbench", "search", *pool_args(root, 0, parts), "--modes", "image", "text",
                       "--queries", str(work / "image/queries.npy"), str(work / "text/queries.npy"),
                       "--tables", str(work / "image/queries.parquet"), str(work / "text/queries.parquet"),
                       "--tile-rows", str(args.tile_rows), "--out", str(work / f"block_{parts}_{rep}.npz"), "--spec", spec],
                      f"block of {parts} parts (repeat {rep})", rows, args.threads)
            times[parts].append(row["wall_s"] / (parts * args.part_rows) * 1e6)
            peaks[parts] = max(peaks.get(parts, 0.0), row["peak_rss_mb"])
    out = {str(p): {"s_per_million_rows": float(np.median(t)), "spread": float(max(t) - min(t)), "peak_rss_mb": peaks[p]}
           for p, t in times.items()}
    ratio = out[str(large)]["s_per_million_rows"] / out[str(small)]["s_per_million_rows"]
    print(f"  {small} part(s): {out[str(small)]['s_per_million_rows']:.1f} s per 1M rows, peak {peaks[small]:.0f} MB;  "
          f"{large} parts: {out[str(large)]['s_per_million_rows']:.1f} s per 1M rows, peak {peaks[large]:.0f} MB;  "
          f"cost per row ratio {ratio:.2f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/augbench-retrieval-scale"))
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    p.add_argument("--part-rows", type=int, default=250_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--queries-per-class", type=int, default=32)
    p.add_argument("--n-aug", type=int, default=128)
    p.add_argument("--overfetch", type=float, default=2.0)
    p.add_argument("--margin", type=float, default=2.0)
    p.add_argument("--parts-per-block", type=int, default=4)
    p.add_argument("--tile-rows", type=int, default=131072)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--factory", default="IVF1024,PQ64x8")
    p.add_argument("--nprobe", type=int, default=128)
    p.add_argument("--refine", type=int, default=200)
    p.add_argument("--train-size", type=int, default=100_000)
    p.add_argument("--ann-queries", type=int, default=1000)
    p.add_argument("--no-ann", action="store_true")
    p.add_argument("--block-parts", type=int, nargs=2, default=[1, 4], help="two search-block sizes, in parts, to compare")
    p.add_argument("--block-repeats", type=int, default=2)
    p.add_argument("--blocks-only", action="store_true", help="only the search block's cost at the two block sizes")
    p.add_argument("--merge-only", action="store_true", help="re-run only the merge jobs on the search blocks of an earlier run")
    args = p.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    work = args.work
    world = World(args.dim, args.classes * 4)
    n_parts = [-(-s // args.part_rows) for s in args.sizes]
    print(f"pool: {args.sizes} rows x {args.dim}-d fp16 in parts of {args.part_rows}; queries: {args.classes} classes x "
          f"{args.queries_per_class} image + {args.classes} text; n_aug {args.n_aug} x overfetch {args.overfetch}; "
          f"{args.threads} threads", flush=True)
    if not args.merge_only:
        write_pool(world, work / "pool_full", max(args.block_parts) if args.blocks_only else max(*n_parts, *args.block_parts),
                   args.part_rows)
        write_queries(world, work, args.classes, args.queries_per_class)
    rows: list[dict] = []
    summary: dict[str, object] = {}
    if args.blocks_only:
        args.sizes, n_parts = [], []
    for size, parts in zip(args.sizes, n_parts, strict=True):
        tag = f"{size / 1e6:g}M"
        root = work / f"pool_{tag}"
        if args.merge_only:
            merge_jobs(root, work, work / f"exact_{tag}", sorted(str(b) for b in (work / f"exact_{tag}").glob("*.npz")), args, rows, tag)
            continue
        link_subset(work / "pool_full", root, parts)
        print(f"{tag} rows ({parts} parts):", flush=True)
        search_s = exact_path(root, work, work / f"exact_{tag}", parts, args, rows, tag)
        summary[f"{tag}_search_s"] = search_s
        if size == args.sizes[0]:
            base_s = knn_baseline(root, work, parts, args, rows)
            summary["baseline_knn_s"] = base_s
            summary["throughput_ratio_vs_faiss_knn"] = base_s / search_s
            summary["exact_recall_vs_brute_force"] = exact_recall(work / f"exact_{tag}", work, args.part_rows)
        if not args.no_ann and size == args.sizes[-1]:
            infos = ann_path(root, work, work / f"ann_{tag}", parts, args, rows, tag)
            summary[f"{tag}_ann_recall_at_10"] = infos["recall_at_10"]
            summary[f"{tag}_ann_ms_per_query"] = infos["ms_per_query"]
    if not args.merge_only:
        summary["search_block_sizes"] = block_sizes(work, args, rows)
    table = pd.DataFrame(rows)
    print("\nper job (peak RSS of the process itself, wall time):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    small, large = (f"{s / 1e6:g}M" for s in (args.sizes[0], args.sizes[-1])) if args.sizes else ("-", "-")
    print("\npeak RSS, largest over each kind of job:")
    for kind in ("search block", "merge image", "merge text", "index-add") if args.sizes else ():
        a = table[table["job"].str.startswith(small) & table["job"].str.contains(kind)]["peak_rss_mb"]
        b = table[table["job"].str.startswith(large) & table["job"].str.contains(kind)]["peak_rss_mb"]
        if len(a) and len(b):
            print(f"  {kind:<14} {small}: {a.max():7.0f} MB   {large}: {b.max():7.0f} MB   ratio {b.max() / a.max():.3f}")
    print("\nsummary:", json.dumps(summary, indent=2))
    out = work / ("summary_merge.json" if args.merge_only else "summary.json")
    out.write_text(json.dumps({"summary": summary, "jobs": rows}, indent=2))


if __name__ == "__main__":
    main()
