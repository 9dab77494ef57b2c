"""The shipped toy foundation models (models/toy/, `make toy-models`): the manifest holds for the files in the repository."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from augbench.toy.ship import MANIFEST, sha256

TOY = Path(__file__).parents[2] / "models/toy"


def test_manifest_sha256_match_the_shipped_files_and_they_fit_the_budget() -> None:
    manifest = json.loads((TOY / MANIFEST).read_text())
    files = {str(f.relative_to(TOY)): f for f in TOY.rglob("*") if f.is_file() and f.name != MANIFEST}
    assert set(manifest["files"]) == set(files)
    for rel, f in files.items():
        assert sha256(f) == manifest["files"][rel], rel
    assert sum(f.stat().st_size for f in files.values()) <= 40e6
    assert manifest["command"] == "make toy-models" and manifest["seconds"]["diffusion"] > 0
    assert manifest["quality"]["fidelity_learning_curve"], "the curve that chose the step count"


def test_config_yaml_loads_the_shipped_models_and_they_load_as_the_real_ones_do() -> None:
    import yaml

    repo = TOY.parents[1]
    cfg = yaml.safe_load((repo / "config.yaml").read_text())
    assert (repo / cfg["clip"]["model"]).resolve() == (TOY / "clip").resolve()
    assert (repo / cfg["diffusion"]["model"]).resolve() == (TOY / "diffusion").resolve()
    manifest = json.loads((TOY / MANIFEST).read_text())
    assert {k: v for k, v in manifest["world"].items() if k != "version"} == cfg["world"], "shipped for the default world"
    from diffusers import StableDiffusionPipeline

    from augbench.embed import Clip

    pipe = StableDiffusionPipeline.from_pretrained(str(TOY / "diffusion"), safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.dtype.is_floating_point and len(pipe.tokenizer) > 10
    assert Clip(TOY / "clip").texts(["a photo of a circle."]).shape[0] == 1


def test_the_shipped_toy_clip_recognises_the_default_worlds_classes_far_above_chance(tmp_path: Path) -> None:
    """Zero-shot over "a photo of a {class}." on a freshly rendered test split of the world it was shipped for:
    chance is 1 in 10; the manifest records 0.962 on the full split, the floor here is 0.8."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from augbench.embed import Clip
    from augbench.specs import WorldSpec
    from augbench.toy.world import build_world

    manifest = json.loads((TOY / "manifest.json").read_text())
    spec = WorldSpec(**{k: v for k, v in manifest["world"].items() if k != "version"})
    spec = dataclasses.replace(spec, shots=1, val_per_class=1, test_per_class=10, pool_size=1)
    build_world(spec, tmp_path)
    test = pd.read_parquet(tmp_path / "target/test.parquet")
    classes = json.loads((tmp_path / "classes.json").read_text())
    clip = Clip(TOY / "clip")
    text = clip.texts([f"a photo of a {classes['names'][k]}." for k in classes["classes"]])
    pred = np.argmax(clip.images([Image.open(tmp_path / p).convert("RGB") for p in test["path"]]) @ text.T, axis=1)
    top1 = float((pred == test["label"].to_numpy()).mean())
    assert top1 >= 0.8, f"the shipped toy CLIP's zero-shot top-1 is {top1:.2f} (chance 0.10)"
