"""The merge's leak search looks only at what a class can keep: the first window of its ranked candidates, and the next
window only when de-duplication or the leak filter removed too many. The result is the one a search over every
candidate gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import augbench.retrieve as retrieve
from augbench.pool import PoolPart
from augbench.retrieve import leak_window, make_queries, merge
from augbench.search import search_block
from augbench.specs import RetrieveSpec

DIM, N_AUG = 16, 10


def _world(tmp: Path) -> tuple[list[PoolPart], Path]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, DIM))
    pool = [centres[i % 3] + 0.6 * rng.normal(size=DIM) for i in range(600)]
    # class 0's best neighbours are 40 copies of one picture: de-duplication keeps one, so its window must grow
    pool[:40] = [centres[0] * 3 + 0.001 * rng.normal(size=DIM) for _ in range(40)]
    pool[100], pool[101] = centres[1], centres[2]  # the best neighbours of classes 1 and 2 are copies of test images
    pool = np.asarray(pool)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    (tmp / "img_emb").mkdir()
    (tmp / "metadata").mkdir()
    np.save(tmp / "img_emb/img_emb_0.npy", pool.astype(np.float16))
    pd.DataFrame({"url": [f"u{i}" for i in range(600)], "caption": "c"}).to_parquet(tmp / "metadata/metadata_0.parquet")
    train = np.stack([centres[i % 3] + 0.3 * rng.normal(size=DIM) for i in range(9)])
    evals = np.stack([pool[100], pool[101]] + [centres[i % 3] + 0.5 * rng.normal(size=DIM) for i in range(4)])  # 2 copies
    for name, v, labels in (("train", train, [i % 3 for i in range(9)]), ("test", evals, [1, 2, 0, 1, 2, 0])):
        np.save(tmp / f"{name}.npy", (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32))
        pd.DataFrame({"path": [f"{name}/{i}.jpg" for i in range(len(v))], "label": labels,
                      "class": [f"c{x}" for x in labels]}).to_parquet(tmp / f"{name}.parquet")
    (tmp / "classes.json").write_text(json.dumps({"classes": ["c0", "c1", "c2"]}))
    make_queries("image", tmp / "classes.json", tmp / "q.npy", tmp / "q.parquet", train=(tmp / "train.npy", tmp / "train.parquet"))
    part = PoolPart("0", tmp / "img_emb/img_emb_0.npy", tmp / "metadata/metadata_0.parquet")
    search_block([part], 0, {"image": (tmp / "q.npy", tmp / "q.parquet")}, tmp / "b.npz",
                 {"n_aug": N_AUG, "overfetch": 2, "margin": 8, "tile_rows": 128})
    return [part], tmp


def _merge(tmp: Path, parts: list[PoolPart], tag: str) -> tuple[pd.DataFrame, dict]:
    spec = RetrieveSpec(mode="image", n_aug=N_AUG, overfetch=2, dedup_threshold=0.995)
    stats = merge([tmp / "b.npz"], tmp / "q.parquet", parts, tmp / "classes.json", [(tmp / "test.npy", tmp / "test.parquet")],
                  tmp / f"{tag}.parquet", tmp / f"{tag}.json", spec)
    return pd.read_parquet(tmp / f"{tag}.parquet"), stats


def test_only_the_window_is_screened_and_the_result_equals_a_full_screen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts, tmp = _world(tmp_path)
    windowed, stats = _merge(tmp, parts, "windowed")
    need, window = N_AUG * 2, leak_window(N_AUG * 2)
    per = stats["per_class"]
    assert all(per[c]["kept"] == need for c in per), per
    assert per["c0"]["near_dup_removed"] >= 39 and per["c0"]["screened"] > window, "class 0's window grew past its copies"
    assert per["c1"]["screened"] == window < per["c1"]["candidates"], "class 1 needed one window of its candidates"
    assert stats["screened"] < sum(p["candidates"] for p in per.values())
    assert windowed["leak_suspects"].map(len).sum() >= 1, "the planted copy of a test image was nominated"
    monkeypatch.setattr(retrieve, "leak_window", lambda need: 10**9)
    full, full_stats = _merge(tmp, parts, "full")
    assert full_stats["screened"] == sum(p["candidates"] for p in per.values())
    pd.testing.assert_frame_equal(windowed, full)
