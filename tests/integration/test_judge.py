"""The judge scores an image set the way the classifier's own evaluation does, and each image counts for one class."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import subprocess_env

from augbench.shards import Sample, with_pointers, write_shard
from augbench.specs import WorldSpec, canonical_json
from augbench.toy.world import build_world

SPEC = {"arch": "resnet10", "input_size": 32, "augment": "shift_flip", "epochs": 1, "batch_size": 16, "min_steps": 60,
        "checkpoint_every": 0, "lr": 0.05}


def _run(args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "augbench", *args], capture_output=True, text=True, timeout=600,
                         env=subprocess_env())
    assert res.returncode == 0, res.stderr[-3000:]


def _as_augmentation_set(world: Path, out: Path, shift: int, n_classes: int) -> tuple[Path, Path]:
    """The test split written as a generated method's set (tar + manifest), every label moved by `shift` classes."""
    test = pd.read_parquet(world / "target/test.parquet")
    keys = [f"img_{i:05d}" for i in range(len(test))]
    samples = [Sample(key=k, image=(world / p).read_bytes(), ext="png", caption="", record={})
               for k, p in zip(keys, test["path"], strict=True)]
    out.mkdir(parents=True)
    write_shard(out / "images.tar", samples)
    manifest = pd.DataFrame({"key": keys, "label": (test["label"] + shift) % n_classes,
                             "rank": test.groupby("label").cumcount()})
    with_pointers(manifest, out / "images.tar", out).to_parquet(out / "manifest.parquet")
    return out / "manifest.parquet", out / "images.tar"


def test_judge_on_the_test_split_reproduces_its_test_accuracy(tmp_path: Path) -> None:
    world = tmp_path / "world"
    build_world(WorldSpec(n_classes=3, n_distractors=0, shots=8, val_per_class=8, test_per_class=12, pool_size=10), world)
    judge = tmp_path / "judge"
    _run(["train", "--real", str(world / "target/train.parquet"), str(world / "target/val.parquet"), "--root", str(world),
          "--test", str(world / "target/test.parquet"), "--classes", str(world / "classes.json"), "--seed", "0",
          "--out-metrics", str(judge / "metrics.json"), "--out-ckpt", str(judge / "model.pt"), "--spec", canonical_json(SPEC)])
    metrics = json.loads((judge / "metrics.json").read_text())
    scores = []
    for shift in range(3):
        manifest, _ = _as_augmentation_set(world, tmp_path / f"set{shift}", shift, 3)
        out = tmp_path / f"set{shift}/judge.json"
        _run(["judge", "--ckpt", str(judge / "model.pt"), "--judge-metrics", str(judge / "metrics.json"), "--images",
              str(manifest), "--classes", str(world / "classes.json"), "--out", str(out)])
        scores.append(json.loads(out.read_text()))
    same = scores[0]
    assert same["images"] == metrics["n_test"] == 36 and same["skipped"] == 0
    assert same["judge_fidelity"] == pytest.approx(metrics["top1"]) and same["judge_test_top1"] == metrics["top1"]
    keys = json.loads((world / "classes.json").read_text())["classes"]
    assert same["per_class"] == {keys[int(c)]: v for c, v in metrics["per_class_top1"].items()}
    # every image is assigned to exactly one of the three classes: the three label shifts share it out
    assert sum(s["judge_fidelity"] for s in scores) == pytest.approx(1.0)
    # the workflow's path: the set's decoded folder, memory-mapped, scores the same
    _run(["decode", "--manifest", str(tmp_path / "set0/manifest.parquet"), "--size", "32", "--out", str(tmp_path / "decoded")])
    _run(["judge", "--ckpt", str(judge / "model.pt"), "--judge-metrics", str(judge / "metrics.json"), "--images",
          str(tmp_path / "decoded"), "--classes", str(world / "classes.json"), "--out", str(tmp_path / "decoded.json")])
    decoded = json.loads((tmp_path / "decoded.json").read_text())
    assert decoded["images"] == 36 and decoded["judge_fidelity"] == pytest.approx(same["judge_fidelity"])
