"""A training job killed mid-epoch resumes from its last checkpoint and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

from augbench.specs import WorldSpec, canonical_json
from augbench.toy.world import build_world

SPEC = {"arch": "resnet18", "input_size": 32, "augment": "rrc", "crop_scale": [0.3, 1.0], "epochs": 1, "batch_size": 8,
        "min_steps": 120, "checkpoint_every": 10, "deterministic": True, "lr": 0.05}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "world"
    build_world(WorldSpec(n_classes=3, n_distractors=0, shots=10, val_per_class=2, test_per_class=6, pool_size=10), out)
    return out


def _train_cmd(world: Path, out: Path, source: str = "tables") -> list[str]:
    """The training job on the split tables, or (`decoded`) as the workflow runs it: on the decode cache's
    memory-mapped folders, written by the `augbench decode` job."""
    real, test, root = world / "target/train.parquet", world / "target/test.parquet", world
    if source == "decoded":
        for split in ("train", "test"):
            folder = world.parent / f"decoded/{split}"
            if not folder.exists():
                res = subprocess.run([sys.executable, "-m", "augbench", "decode", "--table", str(world / f"target/{split}.parquet"),
                                      "--root", str(world), "--size", "32", "--out", str(folder)], capture_output=True,
                                     text=True, timeout=300, env=subprocess_env())
                assert res.returncode == 0, res.stderr[-2000:]
        real, test, root = world.parent / "decoded/train", world.parent / "decoded/test", Path(".")
    return [sys.executable, "-m", "augbench", "train", "--real", str(real), "--root", str(root),
            "--test", str(test), "--classes", str(world / "classes.json"), "--seed", "3",
            "--out-metrics", str(out / "metrics.json"), "--out-ckpt", str(out / "model.pt"), "--spec", canonical_json(SPEC)]


def _kill_at_first_checkpoint(cmd: list[str], resume: Path) -> subprocess.Popen:
    """Start a training run and SIGKILL it (no cleanup at all) as soon as its first checkpoint lands."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    deadline = time.time() + 300
    while not resume.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return proc


@pytest.mark.parametrize("source", ["tables", "decoded"])
def test_killed_training_resumes_to_the_uninterrupted_result(world: Path, tmp_path: Path, source: str) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    res = subprocess.run(_train_cmd(world, whole, source), capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-3000:]

    # the second run is killed (SIGKILL: no cleanup at all) as soon as its first checkpoint lands
    resume = killed / "resume.pt"
    proc = _kill_at_first_checkpoint(_train_cmd(world, killed, source), resume)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert resume.exists() and not (killed / "metrics.json").exists() and not (killed / "model.pt").exists()
    step = torch.load(resume, weights_only=True)["step"]
    steps_per_epoch = 30 // SPEC["batch_size"]
    assert 0 < step < SPEC["min_steps"] and step % steps_per_epoch != 0, f"checkpoint at step {step} is not mid-epoch"

    res = subprocess.run(_train_cmd(world, killed, source), capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {resume} at step {step}" in res.stderr
    assert not resume.exists(), "the resume checkpoint is removed once the run is complete"

    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert b["resumed_from_step"] == step and a["resumed_from_step"] == 0
    for key in ("top1", "top5", "per_class_top1", "final_loss", "steps", "n_test"):
        assert a[key] == b[key], key
    wa = torch.load(whole / "model.pt", weights_only=True)["model"]
    wb = torch.load(killed / "model.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_of_another_run_is_not_resumed(world: Path, tmp_path: Path) -> None:
    """A resume.pt left by a run with other settings must not leak into this one."""
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"identity": {"spec": "something else"}, "step": 50, "loss_ema": 0.0, "model": {}, "optimizer": {}}, out / "resume.pt")
    res = subprocess.run(_train_cmd(world, out), capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "belongs to another run" in res.stderr
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 0


def _augment_set(world: Path, out: Path, colour: int) -> tuple[Path, Path]:
    """An augmentation set of 4 images per class (manifest + tar); `colour` tints every image, same keys and size."""
    import io

    import pandas as pd
    from PIL import Image

    from augbench.shards import Sample, with_pointers, write_shard

    extra = pd.read_parquet(world / "target/train_extra.parquet").groupby("label").head(4).reset_index(drop=True)
    samples, rows = [], []
    for i, r in extra.iterrows():
        img = Image.open(world / r["path"]).convert("RGB")
        img.paste((colour, 0, 0), (0, 0, 8, 8))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        key = f"aug{i:04d}"
        samples.append(Sample(key, buf.getvalue(), "png", "", {}))
        rows.append({"key": key, "label": int(r["label"]), "class": r["class"], "rank": int(i) % 4})
    out.mkdir(parents=True, exist_ok=True)
    write_shard(out / "images.tar", samples)
    with_pointers(pd.DataFrame(rows), out / "images.tar", out).to_parquet(out / "manifest.parquet")
    return out / "manifest.parquet", out / "images.tar"


def test_a_regenerated_augmentation_set_of_the_same_size_is_not_resumed(world: Path, tmp_path: Path) -> None:
    """Killed mid-run, then its augmentation set is regenerated (same keys, same size, other pixels): start again."""
    manifest, _ = _augment_set(world, tmp_path / "aug", colour=0)
    out = tmp_path / "run"
    cmd = [*_train_cmd(world, out), "--aug-manifest", str(manifest), "--n-aug", "4"]
    resume = out / "resume.pt"
    _kill_at_first_checkpoint(cmd, resume)
    assert resume.exists(), "killed before the first checkpoint"
    _augment_set(world, tmp_path / "aug", colour=255)  # regenerated in place
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "belongs to another run" in res.stderr and "inputs" in res.stderr
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 0
