"""Any class folder name works: dots (Caltech-256's 001.ak47), spaces, apostrophes, non-ASCII letters.

The key that names files and jobs is a slug; the folder is read as it is; the prompt says the display name.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import scheduled_jobs
from PIL import Image
from test_real_configs import _fake_laion
from test_workflow import _copy_workflow, _smk

from augbench.methods import GENERATION_METHODS, PERSONALIZED
from augbench.target import SAFE_KEY, TargetSpec, build_target, class_key, target_classes

ODD = {"001.ak47": "circle", "002.o'brien's square": "square", "003.crème brûlée": "triangle"}


def _tree(root: Path, per_class: int = 12) -> Path:
    from augbench.toy.world import render

    r = random.Random(0)
    for folder, kind in ODD.items():
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            render(kind, r, 32, pool=False)[0].save(root / folder / f"{i}.png")
    return root


@pytest.mark.parametrize("folder", ["001.ak47", "o'brien's hat", "crème brûlée", "a b", "a_b", "x" * 300, "...", "n01440764"])
def test_class_keys_are_safe_stable_and_distinct(folder: str) -> None:
    key = class_key(folder)
    assert SAFE_KEY.fullmatch(key) and len(key) <= 64 and key == class_key(folder)
    assert (key == folder) == bool(SAFE_KEY.fullmatch(folder) and len(folder) <= 64)
    assert class_key("a b") != class_key("a_b") and class_key("a b") != class_key("a  b")


def test_target_tables_use_keys_and_read_the_original_folders(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    spec = TargetSpec(root=str(root), train_dir=".", test_dir=None, train_fraction=None, train_per_class=3, val_per_class=2)
    classes = target_classes(spec)
    assert [n for _, n in classes] == ["ak47", "o'brien's square", "crème brûlée"]
    build_target(spec, tmp_path / "out")
    info = json.loads((tmp_path / "out/classes.json").read_text())
    assert info["classes"] == [k for k, _ in classes] and set(info["folders"].values()) == set(ODD)
    train = pd.read_parquet(tmp_path / "out/target/train.parquet")
    for key, folder in info["folders"].items():
        rows = train[train["class"] == key]
        assert len(rows) == 3 and all(Path(p).parent.name == folder for p in rows["path"])


def test_caltech_config_plans_every_generated_method_over_dotted_folders(tmp_path: Path) -> None:
    wf = _copy_workflow(tmp_path / "wf")
    root = _tree(tmp_path / "caltech/256_ObjectCategories", per_class=40)
    site = {"target": {"root": str(tmp_path / "caltech")}, "pool": {"embeddings": str(_fake_laion(tmp_path / "laion"))}}
    (wf / "site.yaml").write_text(yaml.safe_dump(site))
    res = _smk(wf, "-n", "-p", "--configfile", "config/imagenet10.yaml", "config/caltech256.yaml", "site.yaml", timeout=300,
               env={"HF_HUB_OFFLINE": "0"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = scheduled_jobs(res.stdout)
    # one job per configured method and block of class_block (50) classes
    configured = yaml.safe_load((wf / "config/imagenet10.yaml").read_text())["methods"]
    generated = [m for m in configured if m in GENERATION_METHODS]
    personalised = [m for m in configured if m in PERSONALIZED]
    assert len(generated) == 8 and jobs["generate"] == len(generated) and jobs["personalize"] == len(personalised)
    keys = [class_key(folder) for folder in sorted(ODD)]
    assert res.stdout.count(f"--keys {' '.join(keys)} ") == len(generated) + len(personalised)
    for key in keys:  # the collect job reads each class's images from its block's folder
        assert f"results/caltech256/generate/prompt_classname/block_0000/{key}/manifest.parquet" in res.stdout
    assert root.exists()


def test_a_run_over_odd_folder_names_generates_and_trains_on_the_generated_images(tmp_path: Path, tiny_sd: Path) -> None:
    from augbench.specs import ClipSpec
    from augbench.toy.clip_train import save_clip, train_clip

    root = _tree(tmp_path / "data")
    files = sorted(root.rglob("*.png"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    clip = tmp_path / "clip"
    spec = ClipSpec(steps=3, batch_size=16, warmup_steps=1, vocab_size=600)
    model, tokenizer, _ = train_clip(images, [f"a photo of a {ODD[p.parent.name]}" for p in files], spec)
    save_clip(model, tokenizer, spec.image_size, clip)

    wf = _copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg.update({"dataset": "odd", "methods": ["real", "prompt_classname", "textual_inversion"], "n_aug": [3], "seeds": [0],
                "real_per_class": 3, "clip": {"model": str(clip)}, "diffusion": {"model": str(tiny_sd)},
                "target": {"source": "imagefolder", "root": str(root), "train_dir": ".", "test_dir": None,
                           "train_fraction": None, "train_per_class": 3, "val_per_class": 2, "test_per_class": 4},
                "pool": {"embeddings": str(_fake_laion(tmp_path / "laion"))},  # never searched: no retrieval row
                "report": {"judge": False}})
    (wf / "odd.yaml").write_text(yaml.safe_dump(cfg))
    targets = [f"results/odd/train/{m}/3/0/metrics.json" for m in ("prompt_classname", "textual_inversion")]
    res = _smk(wf, *targets, "--cores", "2", "--configfile", "odd.yaml", timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    for target in targets:
        metrics = json.loads((wf / target).read_text())
        assert metrics["n_aug_images"] == 3 * len(ODD) and metrics["n_real"] == 3 * len(ODD)
    manifest = pd.read_parquet(wf / "results/odd/augment/prompt_classname/manifest.parquet")
    assert set(manifest["class"]) == {class_key(f) for f in ODD}
    assert "a photo of a o'brien's square." in set(manifest["prompt"])  # the prompt says the display name
