"""The real path in miniature: every method row, end to end, on tiny randomly initialised instances of the real classes.

A researcher's first run: an ImageFolder of non-square JPEG photos, a url pool of non-square JPEGs served on 127.0.0.1
and downloaded with img2dataset, a `transformers.CLIPModel` with a ViT tower, and a Stable Diffusion v1 folder in the
layout the hub serves today (safetensors with an fp16 variant), then in the older v1-4 layout (`.bin` weights, safety
checker and feature extractor in `model_index.json`). `AUGBENCH_FORBID_TOY=1` makes any import of the toy package fail
the job. The val split is empty (val_per_class 0), so every job that reads it must handle an empty part. Numbers mean
nothing here; every row must have its images and a top-1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import build_tiny_clip, build_tiny_sd, scheduled_jobs, sd_layout
from photos import jpeg, photo
from test_workflow import _copy_workflow, _smk

from augbench.methods import BASELINES, REGISTRY

pytestmark = pytest.mark.slow
KINDS = ("heron", "kayak", "tram")
N_AUG = 3


def _photos(tmp_path: Path, served: Path, base: str) -> tuple[Path, Path]:
    data = tmp_path / "photos"
    seed = 0
    for split, n in (("train", 5), ("val", 3)):  # val/ is the held-out test folder (test_dir), as ImageNet's
        for label, kind in enumerate(KINDS):
            (data / split / kind).mkdir(parents=True)
            for i in range(n):
                seed += 1
                size = (64, 48) if i % 2 else (40, 56)
                (data / split / kind / f"IMG_{seed:04d}.JPEG").write_bytes(jpeg(photo(seed, label, size)))
    rows = []
    for i in range(96):
        label = i % 4  # three classes and a distractor
        (served / f"{i}.jpg").write_bytes(jpeg(photo(1000 + i, label, (72, 48) if i % 3 else (48, 72))))
        rows.append({"url": f"{base}/{i}.jpg", "caption": f"a photo of a {(*KINDS, 'lighthouse')[label]}"})
    pd.DataFrame(rows).to_parquet(tmp_path / "urls.parquet")
    return data, tmp_path / "urls.parquet"


def real_path_inputs(tmp_path: Path, server: tuple[str, Path, list[str]]) -> tuple[Path, Path, Path, Path]:
    """(photo folders, pool url table, tiny CLIP folder, tiny SD folder in the current hub layout) for KINDS."""
    base, served, _ = server
    data, urls = _photos(tmp_path, served, base)
    clip = build_tiny_clip(tmp_path / "clip", KINDS)
    sd = sd_layout(build_tiny_sd(tmp_path / "tiny_sd", KINDS), tmp_path / "sd15", "current")
    return data, urls, clip, sd


def photo_target(data: Path) -> dict:
    """The `target` section for _photos' folders: two train photos per class, val/ as the test split."""
    return {"source": "imagefolder", "root": str(data), "train_dir": "train", "test_dir": "val", "class_list": "folders",
            "train_fraction": None, "train_per_class": 2, "val_per_class": 0}


def _check_rows(out: Path, methods: list[str]) -> pd.DataFrame:
    results = pd.read_csv(out / "report/results.csv")
    assert sorted(results["method"]) == sorted(methods), results
    assert results["top1_mean"].notna().all() and results["top1_mean"].between(0, 1).all()
    for m in methods:
        if m in BASELINES:
            continue
        manifest = pd.read_parquet(out / f"augment/{m}/manifest.parquet")
        per_class = manifest.groupby("class").size().reindex(list(KINDS), fill_value=0)
        assert (per_class > 0).all(), (m, per_class.to_dict())
        if REGISTRY[m].family == "generated":
            assert (per_class == N_AUG).all(), (m, per_class.to_dict())
    return results


def test_every_method_row_runs_on_the_real_classes_in_both_hub_layouts(
        tmp_path: Path, recording_server: tuple[str, Path, list[str]]) -> None:
    base, served, _ = recording_server
    data, urls = _photos(tmp_path, served, base)
    clip = build_tiny_clip(tmp_path / "clip-vit-large-patch14", KINDS)
    tiny = build_tiny_sd(tmp_path / "tiny_sd", KINDS)
    current = sd_layout(tiny, tmp_path / "stable-diffusion-v1-5", "current")
    old = sd_layout(tiny, tmp_path / "stable-diffusion-v1-4", "v1-4")
    assert list(current.glob("unet/*.fp16.safetensors")) and list(old.glob("unet/*.bin"))
    assert "safety_checker" in json.loads((old / "model_index.json").read_text())

    methods = list(REGISTRY)
    wf = _copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg.update({"dataset": "real", "methods": methods, "n_aug": [N_AUG], "sweep_methods": None, "real_per_class": 2,
                "target": photo_target(data), "pool": {"urls": str(urls), "parts": 2},
                "clip": {"model": str(clip)}, "diffusion": {"model": str(current)},
                "download": {"timeout": 5, "image_size": 32, "resize_mode": "center_crop"},
                "fetch": {"min_yield": 0.0}})
    (wf / "real.yaml").write_text(yaml.safe_dump(cfg))
    forbid = {"AUGBENCH_FORBID_TOY": "1"}
    res = _smk(wf, "--cores", "2", "--configfile", "real.yaml", timeout=1500, env=forbid)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    out = wf / "results/real"
    _check_rows(out, methods)
    assert len(pd.read_parquet(out / "dataset/target/val.parquet")) == 0, "the empty val split ran through every job"
    assert np.load(out / "embed/target/img_emb/val.npy").shape == (0, 24)
    assert not (out / "world").exists() and not (out / "clip/model").exists() and not (out / "diffusion/model").exists()

    # the v1-4 layout through img2img and both personalised-denoiser rows with the full UNet fine-tuned (the first run
    # used LoRA): only what depends on the diffusion model runs again
    cfg["diffusion"] = {"model": str(old)}
    # (both retrieval modes stay: a search block serves every mode of the run, so dropping one would search again)
    cfg["methods"] = ["real", "retrieval_image", "retrieval_text", "img2img", "textual_inversion_dm", "cond_vectors_dm"]
    cfg["personalize"] = {**cfg.get("personalize", {}), "dm_finetune": "full"}
    (wf / "real.yaml").write_text(yaml.safe_dump(cfg))
    dry = scheduled_jobs(_smk(wf, "-n", "--configfile", "real.yaml", env=forbid).stdout)
    assert "fetch_retrieved" not in dry and "embed_pool" not in dry and dry["personalize"] == 2 and dry["generate"] == 3, dry
    assert dry["train"] == 3, f"only the three rows that use the diffusion model train again: {dry}"
    # run what the layout changes (personalise and generate); training on the images is the first run's code path
    generated = ["img2img", "textual_inversion_dm", "cond_vectors_dm"]
    res = _smk(wf, *[f"results/real/generate/{m}/block_0000" for m in generated], "--cores", "2", "--configfile", "real.yaml",
               timeout=1500, env=forbid)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    for m in generated:
        for kind in KINDS:
            assert len(pd.read_parquet(out / f"generate/{m}/block_0000/{kind}/manifest.parquet")) == N_AUG, (m, kind)
    assert (out / "personalize/cond_vectors_dm/block_0000/heron/unet").is_dir(), "a full UNet copy from the .bin layout"
