"""The merge job's leak search at two sizes: wall time and peak RSS of the workflow's own `retrieve` job, against one bare
`faiss.knn` call over the same candidates and val + test vectors.

A random pool (unit vectors, `--dim` wide, float16 in clip-retrieval's layout) is searched by `--queries-per-class`
queries per class (the `search` job); the `retrieve` job then merges the top-k, searches each class's candidates
against the eval vectors for leaks, de-duplicates and keeps n_aug x overfetch per class. Printed per size:

  * the job's wall time and peak RSS (a subprocess: `python -m augbench retrieve`, its own VmHWM);
  * the candidates and how many the leak search screened (a class's window: what it can keep, plus a quarter);
  * bare: one `faiss.knn` of the screened rows against the eval vectors (k = leak_match_candidates), and of every
    candidate (what the merge searched before windows); ratio = bare(screened) / the job's leak-search time.

At ImageNet-10 % scale (1,000 classes, n_aug 512, overfetch 2, 60k eval images, 768-d) the work is 10x the default
`--classes 100 --eval 6000` in each of two directions; this machine (2 cores) runs the default in minutes.

    PYTHONPATH=src python benchmarks/merge_leak_search.py                  # 50 and 100 classes, 6,000 eval rows
    PYTHONPATH=src python benchmarks/merge_leak_search.py --classes 1000 --eval 60000 --threads 16

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from retrieval_scale import _with_hwm  # noqa: E402

from augbench.pool import PoolPart  # noqa: E402
from augbench.retrieve import leak_window, make_queries  # noqa: E402
from augbench.search import search_block  # noqa: E402


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def run(tmp: Path, classes: int, a: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(classes)
    need = a.n_aug * a.overfetch
    pool_rows = int(classes * need * a.margin * 1.1)
    (tmp / "img_emb").mkdir(parents=True)
    (tmp / "metadata").mkdir(parents=True)
    for start in range(0, pool_rows, 500_000):  # written in slices: the benchmark itself stays small
        n = min(500_000, pool_rows - start)
        np.save(tmp / f"slice_{start}.npy", unit(rng, n, a.dim).astype(np.float16))
    emb = np.concatenate([np.load(tmp / f"slice_{s}.npy") for s in range(0, pool_rows, 500_000)])
    np.save(tmp / "img_emb/img_emb_0.npy", emb)
    del emb
    pd.DataFrame({"url": [f"u{i}" for i in range(pool_rows)], "caption": "c"}).to_parquet(tmp / "metadata/metadata_0.parquet")
    part = PoolPart("0", tmp / "img_emb/img_emb_0.npy", tmp / "metadata/metadata_0.parquet")
    labels = np.repeat(np.arange(classes), a.queries_per_class)
    np.save(tmp / "train.npy", unit(rng, len(labels), a.dim))
    pd.DataFrame({"path": [f"t{i}" for i in range(len(labels))], "label": labels, "class": [f"c{x}" for x in labels]}).to_parquet(
        tmp / "train.parquet")
    (tmp / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(classes)]}))
    np.save(tmp / "eval.npy", unit(rng, a.eval, a.dim))
    pd.DataFrame({"path": [f"e{i}" for i in range(a.eval)], "label": 0, "class": "c0"}).to_parquet(tmp / "eval.parquet")
    make_queries("image", tmp / "classes.json", tmp / "q.npy", tmp / "q.parquet", train=(tmp / "train.npy", tmp / "train.parquet"))
    search_block([part], 0, {"image": (tmp / "q.npy", tmp / "q.parquet")}, tmp / "b.npz",
                 {"n_aug": a.n_aug, "overfetch": a.overfetch, "margin": a.margin, "tile_rows": 65536})
    spec = {"mode": "image", "n_aug": a.n_aug, "overfetch": a.overfetch}
    cmd = [sys.executable, "-m", "augbench", "retrieve", "--blocks", str(tmp / "b.npz"), "--table", str(tmp / "q.parquet"),
           "--pool-emb", str(part.emb), "--pool-meta", str(part.meta), "--pool-names", "0", "--classes", str(tmp / "classes.json"),
           "--eval-emb", str(tmp / "eval.npy"), "--eval-meta", str(tmp / "eval.parquet"), "--out", str(tmp / "n.parquet"),
           "--out-stats", str(tmp / "s.json"), "--spec", json.dumps(spec), "--threads", str(a.threads), "--device", "cpu"]
    t = time.perf_counter()
    res = subprocess.run(_with_hwm(cmd, tmp / "hwm"), capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    wall = time.perf_counter() - t
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    peak = int((tmp / "hwm").read_text())  # the job's own VmHWM (kB): wait4's maxrss carries this script's over fork
    stats = json.loads((tmp / "s.json").read_text())
    candidates = sum(p["candidates"] for p in stats["per_class"].values())
    import faiss

    faiss.omp_set_num_threads(a.threads)
    pool = np.load(part.emb, mmap_mode="r")
    evals = np.load(tmp / "eval.npy")
    screened = min(stats["screened"], pool_rows)
    x = np.ascontiguousarray(pool[:screened], dtype=np.float32)
    t = time.perf_counter()
    faiss.knn(x, evals, 5, metric=faiss.METRIC_INNER_PRODUCT)
    bare_screened = time.perf_counter() - t
    x = np.ascontiguousarray(pool[:min(candidates, pool_rows)], dtype=np.float32)
    t = time.perf_counter()
    faiss.knn(x, evals, 5, metric=faiss.METRIC_INNER_PRODUCT)
    bare_all = time.perf_counter() - t
    log_time = [float(line.rsplit(" ", 1)[1][:-1]) for line in res.stderr.splitlines() if "merge: leak search took" in line]
    return {"classes": classes, "candidates": candidates, "screened": stats["screened"], "window": leak_window(int(need)),
            "wall": wall, "peak_mb": peak / 1024, "leak_search": log_time[0] if log_time else float("nan"),
            "bare_screened": bare_screened, "bare_all": bare_all}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--eval", type=int, default=6000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--n-aug", type=int, default=512)
    ap.add_argument("--overfetch", type=float, default=2.0)
    ap.add_argument("--margin", type=float, default=3.0)
    ap.add_argument("--queries-per-class", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print(f"eval {a.eval}, dim {a.dim}, n_aug {a.n_aug} x overfetch {a.overfetch}, margin {a.margin}, {a.threads} threads")
    for classes in a.classes:
        with tempfile.TemporaryDirectory(prefix="merge_bench_") as d:
            r = run(Path(d), classes, a)
        print(f"  {r['classes']:5d} classes: {r['candidates']:9,d} candidates, screened {r['screened']:9,d} (window {r['window']}); "
              f"job {r['wall']:6.1f} s, peak RSS {r['peak_mb']:6.0f} MB; leak search {r['leak_search']:6.1f} s; bare faiss.knn "
              f"screened {r['bare_screened']:6.1f} s (ratio {r['bare_screened'] / r['leak_search']:.2f}), "
              f"every candidate {r['bare_all']:6.1f} s")


if __name__ == "__main__":
    main()
