"""The real-world configs: ImageNet-10 % DAG at full size, a missing dataset root, and a precomputed LAION-style pool.

The ImageNet and LAION trees here are fakes the tests make (1000 wnid folders with one tiny image each;
a clip-retrieval folder); nothing is downloaded but over 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, scheduled_jobs
from PIL import Image
from test_workflow import _copy_workflow, _smk

from augbench.target import CLASS_LISTS, _read_tsv

METHODS = yaml.safe_load((REPO / "config/imagenet10.yaml").read_text())["methods"]


def _jpeg(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "JPEG")
    return buf.getvalue()


def _fake_imagenet(root: Path) -> Path:
    data = _jpeg((120, 60, 30))
    for wnid, _ in _read_tsv(CLASS_LISTS["imagenet"]):
        for split in ("train", "val"):
            (root / split / wnid).mkdir(parents=True)
            (root / split / wnid / f"{wnid}_0.JPEG").write_bytes(data)
    return root


def _fake_laion(root: Path, n: int = 64, dim: int = 768) -> Path:
    rs = np.random.default_rng(0)
    for part in ("0000", "0001"):
        emb = rs.normal(size=(n, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        (root / "img_emb").mkdir(parents=True, exist_ok=True)
        (root / "metadata").mkdir(parents=True, exist_ok=True)
        np.save(root / "img_emb" / f"{part}.npy", emb.astype(np.float16))
        pd.DataFrame({"url": [f"http://example.invalid/{part}/{i}.jpg" for i in range(n)],
                      "caption": [f"caption {i}" for i in range(n)]}).to_parquet(root / "metadata" / f"{part}.parquet")
    return root


def test_imagenet10_dag_for_every_method_seed_and_n_aug_builds_within_a_minute(tmp_path: Path) -> None:
    wf = _copy_workflow(tmp_path / "wf")
    imagenet = _fake_imagenet(tmp_path / "imagenet")
    laion = _fake_laion(tmp_path / "laion")
    (wf / "site.yaml").write_text(yaml.safe_dump({"target": {"root": str(imagenet)}, "pool": {"embeddings": str(laion)}}))
    started = time.perf_counter()
    res = _smk(wf, "-n", "--configfile", "config/imagenet10.yaml", "site.yaml", timeout=300)
    seconds = time.perf_counter() - started
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = scheduled_jobs(res.stdout)
    total = int(re.search(r"^total\s+(\d+)", res.stdout, re.M).group(1))
    print(f"\nimagenet10 dry run: {total} jobs in {seconds:.1f} s: {jobs}")
    generated = [m for m in METHODS if m.startswith(("prompt_", "img2img", "textual_", "cond_"))]
    personalised = [m for m in generated if m.startswith(("textual_", "cond_"))]
    augmented = [m for m in METHODS if m not in ("real", "real_x2")]
    assert jobs["generate"] == 1000 * len(generated) and jobs["personalize"] == 1000 * len(personalised)
    assert jobs["train"] == 3 * (2 + 4 * len(augmented))  # 3 seeds; baselines once, the rest at 4 n_aug values
    assert jobs["target"] == 1 and jobs["index"] == 1 and jobs["retrieve"] == 2 and jobs["embed_target"] == 3
    assert "download" not in jobs and "embed_pool" not in jobs and "pretrain_clip" not in jobs, "precomputed pool: nothing re-embedded"
    # n_aug multiples of real_per_class 128
    for n in (64, 128, 256, 512):
        assert f"results/imagenet10/train/retrieval_image/{n}/0/metrics.json" in res.stdout
    assert seconds <= 60, f"the ImageNet DAG took {seconds:.0f} s to build"


def test_missing_dataset_root_fails_naming_it(tmp_path: Path) -> None:
    wf = _copy_workflow(tmp_path / "wf")
    laion = _fake_laion(tmp_path / "laion", n=4)
    missing = tmp_path / "no-such-imagenet"
    (wf / "site.yaml").write_text(yaml.safe_dump({"target": {"root": str(missing)}, "pool": {"embeddings": str(laion)}}))
    res = _smk(wf, "-n", "--configfile", "config/imagenet10.yaml", "site.yaml", timeout=120)
    assert res.returncode != 0
    assert str(missing) in res.stdout + res.stderr and "target.root" in res.stdout + res.stderr


def _render_tree(root: Path, kinds: tuple[str, ...], per_class: int, seed: int) -> None:
    from augbench.world import render

    r = random.Random(seed)
    for kind in kinds:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            render(kind, r, 32, pool=False)[0].save(root / kind / f"{kind}_{i}.png")


@pytest.mark.slow
def test_precomputed_pool_embeddings_are_ingested_retrieved_and_fetched_by_url(
        tmp_path: Path, recording_server: tuple[str, Path, list[str]], tiny_sd: Path) -> None:
    """A clip-retrieval folder made by the test (no `key` column, as in LAION's metadata) is indexed and
    retrieved from without embedding the pool; the retrieved images are downloaded by url over 127.0.0.1;
    a pool copy of a test image is caught by the leak filter although there are no pool pixels to compare."""
    from augbench.clip_train import save_clip, train_clip
    from augbench.embed import Clip
    from augbench.specs import ClipSpec
    from augbench.target import TargetSpec, build_target
    from augbench.world import render

    base, served, requests = recording_server
    kinds = ("circle", "square", "triangle")
    data = tmp_path / "caltech-like"
    _render_tree(data / "objects", kinds, per_class=14, seed=1)

    # the pool: rendered images of the classes and a distractor, served over HTTP, and one copy of a test image
    r = random.Random(2)
    rows, images = [], []
    for i in range(90):
        kind = (*kinds, "hexagon")[i % 4]
        img = render(kind, r, 32, pool=True)[0]
        img.save(served / f"{i}.png")
        rows.append({"url": f"{base}/{i}.png", "caption": f"a photo of a {kind}"})
        images.append(img)
    clip = tmp_path / "clip"
    spec = ClipSpec(steps=3, batch_size=16, warmup_steps=1, vocab_size=600)
    model, tokenizer, _ = train_clip(np.stack([np.asarray(im) for im in images]), [r_["caption"] for r_ in rows], spec)
    save_clip(model, tokenizer, spec.image_size, clip)

    # the target split is a pure function of the spec: build it here to know which image the test split holds,
    # and plant a copy of it in the pool
    target = {"root": str(data), "train_dir": "objects", "test_dir": None, "class_list": "folders", "train_fraction": None,
              "train_per_class": 3, "val_per_class": 2, "test_per_class": 6}
    build_target(TargetSpec(**target), tmp_path / "split")
    test = pd.read_parquet(tmp_path / "split/target/test.parquet")
    leaked = Image.open(test["path"].iloc[0]).convert("RGB")
    leaked.save(served / "leak.png")
    rows.append({"url": f"{base}/leak.png", "caption": "a photo of a circle"})
    images.append(leaked)

    pool = tmp_path / "laion"
    (pool / "img_emb").mkdir(parents=True)
    (pool / "metadata").mkdir()
    emb = Clip(clip).images(images)
    np.save(pool / "img_emb/part0.npy", emb[:50].astype(np.float16))
    np.save(pool / "img_emb/part1.npy", emb[50:].astype(np.float16))
    pd.DataFrame(rows[:50]).to_parquet(pool / "metadata/part0.parquet")
    pd.DataFrame(rows[50:]).to_parquet(pool / "metadata/part1.parquet")

    wf = _copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg.update({"dataset": "pre", "methods": ["real", "retrieval_image", "retrieval_text"], "n_aug": ["1x"], "real_per_class": 2,
                "clip": {"model": str(clip)}, "diffusion": {"model": str(tiny_sd)}, "pool": {"embeddings": str(pool)},
                "target": {"source": "imagefolder", **target},
                "download": {"timeout": 5, "retries": 0, "encode_format": "png", "encode_quality": 9}})
    (wf / "pre.yaml").write_text(yaml.safe_dump(cfg))

    targets = [f"results/pre/augment/{m}/images.tar" for m in ("retrieval_image", "retrieval_text")]
    res = _smk(wf, *targets, "--cores", "2", "--configfile", "pre.yaml", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    jobs = scheduled_jobs(res.stderr)
    assert "embed_pool" not in jobs and "download" not in jobs and jobs["index"] == 1, jobs
    assert not (wf / "results/pre/embed/pool").exists() and not (wf / "results/pre/pool").exists()

    ids = pd.read_parquet(wf / "results/pre/index/ids.parquet")
    assert len(ids) == 91 and set(ids["shard"]) == {"part0", "part1"} and ids["key"].iloc[60] == "part1_000000010"
    neighbors = pd.read_parquet(wf / "results/pre/retrieve/image/neighbors.parquet")
    assert len(neighbors) and set(neighbors["key"]) <= set(ids["key"])
    leak_key = ids.loc[ids["url"].str.endswith("/leak.png"), "key"].item()
    assert leak_key not in set(neighbors["key"])
    assert json.loads((wf / "results/pre/retrieve/image/stats.json").read_text())["leaked_removed"] >= 1

    manifest = pd.read_parquet(wf / "results/pre/augment/retrieval_image/manifest.parquet")
    assert len(manifest) > 0 and manifest.groupby("label")["rank"].max().max() < len(neighbors)
    fetched = {p.rsplit("/", 1)[-1] for p in requests}
    wanted = {u.rsplit("/", 1)[-1] for u in neighbors["url"]}
    assert wanted <= fetched, "every retrieved url was downloaded over 127.0.0.1"
    assert "leak.png" not in fetched
