"""Small classes get a clear answer: a target whose folders cannot fill the splits the config asks for is refused when it
is built, naming the class, its image count and what the splits need; an empty val split (val_per_class 0) is a real,
empty part that the jobs reading it handle (embedding width kept, the merge's leak search runs on test alone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from augbench.embed import embed_split
from augbench.specs import EmbedSpec
from augbench.target import TargetSpec, build_target


def _photos(root: Path, per_class: dict[str, int], split: str = "train") -> None:
    """Non-square JPEG photos (4:3 and 3:4) of random noise, one folder per class, as a phone or a scraper leaves them."""
    rng = np.random.default_rng(0)
    for cls, n in per_class.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = (48, 64) if i % 2 else (64, 48)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / cls / f"IMG_{i:04d}.JPG")


def test_a_class_too_small_for_the_splits_is_refused_naming_it_its_count_and_the_need(tmp_path: Path) -> None:
    _photos(tmp_path / "data", {"ant": 10, "bee": 20, "crème brûlée": 10})
    _photos(tmp_path / "data", {"ant": 2, "bee": 2, "crème brûlée": 2}, split="val")
    spec = TargetSpec(root=str(tmp_path / "data"), train_fraction=None, train_per_class=8, val_per_class=2)
    with pytest.raises(ValueError) as err:
        build_target(spec, tmp_path / "out")
    message = str(err.value)
    assert "ant has 10 images, needs 18 (8 train + 8 train_extra + 2 val)" in message, message
    assert "crème brûlée has 10 images" in message and "bee" not in message and "2 class folder(s)" in message
    assert not (tmp_path / "out/target/val.parquet").exists(), "nothing written for a refused target"
    # a test split drawn from the folders needs at least one image left over (or test_per_class)
    spec = TargetSpec(root=str(tmp_path / "data"), test_dir=None, train_fraction=None, train_per_class=4, val_per_class=2,
                      test_per_class=5)
    with pytest.raises(ValueError, match=r"ant has 10 images, needs 15 \(4 train \+ 4 train_extra \+ 2 val \+ 5 test\)"):
        build_target(spec, tmp_path / "out")
    # what fits is built, every split full
    counts = build_target(TargetSpec(root=str(tmp_path / "data"), train_fraction=None, train_per_class=4, val_per_class=2),
                          tmp_path / "out")
    assert counts == {"train": 12, "train_extra": 12, "val": 6, "test": 6}


def test_an_empty_val_split_keeps_the_embedding_width_and_the_table_columns(tmp_path: Path, tiny_clip: Path) -> None:
    _photos(tmp_path / "data", {"ant": 4, "bee": 4})
    _photos(tmp_path / "data", {"ant": 1, "bee": 1}, split="val")
    counts = build_target(TargetSpec(root=str(tmp_path / "data"), train_fraction=None, train_per_class=2, val_per_class=0),
                          tmp_path / "out")
    assert counts["val"] == 0 and counts["test"] == 2
    spec = EmbedSpec()
    for split in ("val", "test"):
        embed_split(tmp_path / f"out/target/{split}.parquet", Path("/"), tiny_clip, tmp_path / f"{split}.npy",
                    tmp_path / f"{split}.parquet", spec)
    val, test = np.load(tmp_path / "val.npy"), np.load(tmp_path / "test.npy")
    assert val.shape == (0, 24) and test.shape == (2, 24)
    meta = pd.read_parquet(tmp_path / "val.parquet")
    assert len(meta) == 0 and {"path", "label", "class", "dhash"} <= set(meta.columns)
    # what the merge does with the eval parts: one array, one table (numpy refused a (0, 0) part here before)
    assert np.concatenate([val, test]).shape == (2, 24)
    assert len(pd.concat([meta, pd.read_parquet(tmp_path / "test.parquet")], ignore_index=True)) == 2
