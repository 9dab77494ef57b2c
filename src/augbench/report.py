"""The results table: one row per (method, n_aug), mean and std of top-1 over seeds.

For retrieval methods it adds the leaked images removed and, in the toy world only (where the
pool's hidden true labels exist), `retrieval_precision`: the share of the images actually used
for training whose true label is the class they were retrieved for. For generation methods it adds
`generation_fidelity`: the share of generated images CLIP assigns, zero-shot, to their intended class.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from augbench.classify import read_metrics
from augbench.io import atomic_path, write_parquet

log = logging.getLogger(__name__)

COLUMNS = ["method", "n_aug", "seeds", "top1_mean", "top1_std", "top5_mean", "retrieval_precision", "leaked_removed",
           "generation_fidelity"]


def retrieval_precision(manifest: Path, n_aug: int, truth: pd.DataFrame) -> float:
    """Share of the first `n_aug` images per class whose hidden true label equals the class label."""
    m = pd.read_parquet(manifest)
    m = m[m["rank"] < n_aug].assign(key=lambda d: d["key"].astype(str))
    true = m["key"].map(dict(zip(truth["key"].astype(str), truth["true_label"], strict=True)))
    if true.isna().any():
        raise ValueError(f"{manifest}: {int(true.isna().sum())} keys not found in the pool's true labels")
    return float((true.to_numpy() == m["label"].to_numpy()).mean()) if len(m) else float("nan")


def build_table(runs: list[dict[str, object]], retrieval: dict[str, dict[str, Path]], truth: pd.DataFrame | None,
                fidelity: dict[str, Path] | None = None) -> pd.DataFrame:
    """Aggregate runs [{method, n_aug, seed, metrics}] into the results table."""
    records = []
    for r in runs:
        metrics = read_metrics(r["metrics"])
        records.append({"method": r["method"], "n_aug": int(r["n_aug"]), "seed": int(r["seed"]),
                        "top1": metrics["top1"], "top5": metrics["top5"]})
    df = pd.DataFrame(records)
    rows = []
    for (method, n_aug), g in df.groupby(["method", "n_aug"], sort=False):
        row = {"method": method, "n_aug": n_aug, "seeds": len(g), "top1_mean": g["top1"].mean(),
               "top1_std": g["top1"].std(ddof=1) if len(g) > 1 else float("nan"), "top5_mean": g["top5"].mean(),
               "retrieval_precision": float("nan"), "leaked_removed": float("nan"), "generation_fidelity": float("nan")}
        if method in retrieval:
            files = retrieval[method]
            row["leaked_removed"] = json.loads(Path(files["stats"]).read_text())["leaked_removed"]
            if truth is not None:
                row["retrieval_precision"] = retrieval_precision(files["manifest"], n_aug, truth)
        if fidelity and method in fidelity:
            row["generation_fidelity"] = json.loads(Path(fidelity[method]).read_text())["generation_fidelity"]
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def to_markdown(table: pd.DataFrame) -> str:
    """A readable markdown table: top-1 as mean ± std in percent."""
    lines = ["| method | n_aug | seeds | top-1 (%) | top-5 (%) | retrieval precision | leaked removed | generation fidelity |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table.itertuples(index=False):
        std = "" if np.isnan(r.top1_std) else f" ± {100 * r.top1_std:.1f}"
        prec = "" if np.isnan(r.retrieval_precision) else f"{r.retrieval_precision:.3f}"
        leak = "" if np.isnan(r.leaked_removed) else f"{int(r.leaked_removed)}"
        fid = "" if np.isnan(r.generation_fidelity) else f"{r.generation_fidelity:.3f}"
        top = f"{100 * r.top1_mean:.1f}{std} | {100 * r.top5_mean:.1f}"
        lines.append(f"| {r.method} | {r.n_aug} | {r.seeds} | {top} | {prec} | {leak} | {fid} |")
    return "\n".join(lines) + "\n"


def write_report(table: pd.DataFrame, out_csv: Path, out_md: Path) -> None:
    """Write results.csv and results.md atomically."""
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out_md) as tmp:
        tmp.write_text(to_markdown(table))
    write_parquet(out_csv.with_suffix(".parquet"), table)
