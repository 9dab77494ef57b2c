"""The toy world is deterministic from its seed and carries its caption noise."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from augbench.specs import WorldSpec
from augbench.toy.world import build_world, class_names


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file() and not f.name.endswith(".meta.json"):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_world_is_deterministic_and_shaped(tmp_path: Path) -> None:
    spec = WorldSpec(n_classes=3, n_distractors=2, shots=2, val_per_class=2, test_per_class=2, pool_size=200,
                     p_wrong_label=0.2, p_no_object=0.2)
    counts = build_world(spec, tmp_path / "a")
    build_world(spec, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert counts == {"train": 6, "train_extra": 6, "val": 6, "test": 6, "pool": 200}
    pool = pd.read_parquet(tmp_path / "a/pool/pool.parquet")
    assert set(pool["true_kind"]) <= set(class_names(WorldSpec(n_classes=5)))
    assert (pool["true_label"] == -1).any() and (pool["true_label"] >= 0).any()  # distractors and targets
    nouns_missing = pool["caption"].str.contains("img_|untitled|free download|best design|wallpaper hd|new collection|abstract|pattern")
    assert 0.05 < nouns_missing.mean() < 0.4  # about p_no_object, plus chance word overlaps
    train = pd.read_parquet(tmp_path / "a/target/train.parquet")
    assert list(train["class"].unique()) == class_names(spec)
    other = build_world(WorldSpec(**{**spec.__dict__, "seed": 1}), tmp_path / "c")
    assert other == counts and _digest(tmp_path / "c") != _digest(tmp_path / "a")


def test_judge_pool_images_are_labelled_by_true_kind_and_held_out_images_never_train(tmp_path: Path) -> None:
    """The judge's pool images: target kinds only, labelled with the hidden true kind (a caption can name another
    kind), capped per class, and the held-out images it is measured on are never among those it trains on; a larger
    training cap only adds images."""
    import json

    from augbench.toy.world import judge_pool_tables

    world = tmp_path / "world"
    build_world(WorldSpec(n_classes=3, n_distractors=2, shots=2, val_per_class=1, test_per_class=1, pool_size=200), world)
    pool = pd.read_parquet(world / "pool/pool.parquet").set_index("key")
    classes = json.loads((world / "classes.json").read_text())["classes"]
    counts = judge_pool_tables(world, 20, 10, tmp_path / "train.parquet", tmp_path / "heldout.parquet")
    train, held = pd.read_parquet(tmp_path / "train.parquet"), pd.read_parquet(tmp_path / "heldout.parquet")
    assert counts == {"train": len(train), "heldout": len(held)} and len(train) and len(held)
    assert not set(train["key"]) & set(held["key"])
    for t in (train, held):
        truth = pool.loc[t["key"]]
        assert (truth["true_label"].to_numpy() == t["label"].to_numpy()).all() and (truth["file"].to_numpy() == t["path"]).all()
        assert list(t["class"]) == [classes[i] for i in t["label"]]
    assert held.groupby("label").size().max() == 10 and train.groupby("label").size().max() <= 20
    misleading = [k for k in train["key"] if pool.loc[k, "true_kind"] not in pool.loc[k, "caption"]]
    assert misleading, "the world has captions that do not name the kind: the labels must not come from them"
    judge_pool_tables(world, 40, 10, tmp_path / "more.parquet", tmp_path / "held2.parquet")
    assert set(train["key"]) <= set(pd.read_parquet(tmp_path / "more.parquet")["key"])
    assert pd.read_parquet(tmp_path / "held2.parquet").equals(held)
