"""The real-world configs: ImageNet-10 % DAG at full size, a missing dataset root, and a precomputed LAION-style pool.

The ImageNet and LAION trees here are fakes the tests make (1000 wnid folders with one tiny image each;
a clip-retrieval folder); nothing is downloaded but over 127.0.0.1.
"""

from __future__ import annotations

import io
import itertools
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


def _fake_laion(root: Path, n: int = 64, dim: int = 768, parts: int = 3) -> Path:
    """A LAION embedding folder as clip-retrieval's writer names it (img_emb_N.npy beside metadata_N.parquet)."""
    rs = np.random.default_rng(0)
    for part in range(parts):
        emb = rs.normal(size=(n + 7 * part, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        (root / "img_emb").mkdir(parents=True, exist_ok=True)
        (root / "metadata").mkdir(parents=True, exist_ok=True)
        np.save(root / "img_emb" / f"img_emb_{part}.npy", emb.astype(np.float16))
        pd.DataFrame({"url": [f"http://example.invalid/{part}/{i}.jpg" for i in range(len(emb))],
                      "caption": [f"caption {i}" for i in range(len(emb))]}).to_parquet(root / "metadata" / f"metadata_{part}.parquet")
    return root


def _resources_by_rule(dry_run: str) -> dict[str, str]:
    """The `resources:` line of the first job of each rule in a dry run's output."""
    out = {}
    for block in dry_run.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0].strip()
        m = re.search(r"^\s+resources: (.*)$", block, re.M)
        if m and rule not in out:
            out[rule] = m.group(1)
    return out


def test_imagenet10_dag_for_every_method_seed_and_n_aug_builds(tmp_path: Path) -> None:
    wf = _copy_workflow(tmp_path / "wf")
    imagenet = _fake_imagenet(tmp_path / "imagenet")
    laion = _fake_laion(tmp_path / "laion")
    (wf / "site.yaml").write_text(yaml.safe_dump({"target": {"root": str(imagenet)}, "pool": {"embeddings": str(laion)}}))
    started = time.perf_counter()
    # online (HF_HUB_OFFLINE unset): the two hub models are fetched once, by a local rule, into the model cache
    # and with the toy code made unimportable: a real run parses without it
    res = _smk(wf, "-n", "-p", "--configfile", "config/imagenet10.yaml", "site.yaml", timeout=300,
               env={"HF_HUB_OFFLINE": "0", "AUGBENCH_FORBID_TOY": "1"})
    seconds = time.perf_counter() - started
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = scheduled_jobs(res.stdout)
    total = int(re.search(r"^total\s+(\d+)", res.stdout, re.M).group(1))
    print(f"\nimagenet10 dry run: {total} jobs in {seconds:.1f} s: {jobs}")
    generated = [m for m in METHODS if m.startswith(("prompt_", "img2img", "textual_", "cond_"))]
    personalised = [m for m in generated if m.startswith(("textual_", "cond_"))]
    augmented = [m for m in METHODS if m not in ("real", "real_x2")]
    # one job per method and block of 25 classes (class_block), not per class: the model is loaded once per block
    assert jobs["generate"] == 40 * len(generated) and jobs["personalize"] == 40 * len(personalised)
    assert jobs["train"] == 3 * (2 + 4 * len(augmented))  # 3 seeds; baselines once, the rest at 4 n_aug values
    assert jobs["target"] == 1 and jobs["retrieve_gpu"] == 2 and jobs["embed_target"] == 3 and jobs["queries"] == 2
    # retrieve.gpu: the search and the merge run on GPUs under names the profile routes to the GPU partition
    assert jobs["search_block_gpu"] == 1 and "search_block" not in jobs and "retrieve" not in jobs  # 3 parts, 8 a block
    # a remote pool: the candidates are downloaded on a CPU node, then content-checked where CLIP runs
    assert jobs["download_retrieved"] == 2 and jobs["check_retrieved"] == 2 and "fetch_retrieved" not in jobs
    assert "download" not in jobs and "embed_pool" not in jobs and "pretrain_clip" not in jobs, "precomputed pool: nothing re-embedded"
    assert "index_train" not in jobs, "exact search needs no ANN index"
    assert jobs["fetch_model"] == 2
    assert "resources/hub/openai--clip-vit-large-patch14/main" in res.stdout and "CompVis--stable-diffusion-v1-4" in res.stdout
    resources = _resources_by_rule(res.stdout)
    for rule in ("embed_target", "queries", "search_block_gpu", "retrieve_gpu", "download_retrieved", "check_retrieved"):
        assert "mem_mb=" in resources[rule] and "runtime=" in resources[rule], (rule, resources.get(rule))
    assert "gpu=1" in resources["check_retrieved"] and "gpu=" not in resources["download_retrieved"], resources
    assert "--precision fp16" in res.stdout and "--check-cache" in res.stdout
    # n_aug multiples of real_per_class 128
    for n in (64, 128, 256, 512):
        assert f"results/imagenet10/train/retrieval_image/{n}/0/metrics.json" in res.stdout
    # the DAG's build time is printed above, not asserted: wall-clock figures belong in benchmarks, not tests
    assert "results/imagenet10/world/" not in res.stdout, "a real run writes nothing under world/"
    # config.yaml's toy-only recipe settings do not leak into the ImageNet runs layered on it
    specs = [json.loads(s) for s in re.findall(r"augbench train .*?--spec '(\{.*?\})'", res.stdout)]
    assert specs and all(s["colour_invariance"] is False and s["arch"] == "resnet50" for s in specs)
    assert "train_judge" not in jobs
    # the guard is live: the toy config needs the toy code and fails with it forbidden
    toy = _smk(wf, "-n", "--configfile", "config/tiny.yaml", timeout=120, env={"AUGBENCH_FORBID_TOY": "1"})
    assert toy.returncode != 0 and "AUGBENCH_FORBID_TOY" in toy.stdout + toy.stderr


def test_offline_without_the_hub_snapshot_fails_naming_the_model_and_the_fetch_command(tmp_path: Path) -> None:
    wf = _copy_workflow(tmp_path / "wf")
    imagenet = tmp_path / "imagenet"
    (imagenet / "train").mkdir(parents=True)
    laion = _fake_laion(tmp_path / "laion", n=4)
    (wf / "site.yaml").write_text(yaml.safe_dump({"target": {"root": str(imagenet)}, "pool": {"embeddings": str(laion)}}))
    res = _smk(wf, "-n", "--configfile", "config/imagenet10.yaml", "site.yaml", timeout=120, env={"HF_HUB_OFFLINE": "1"})
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "openai/clip-vit-large-patch14" in out and "HF_HUB_OFFLINE" in out
    assert "snakemake --cores 1" in out and "resources/hub/openai--clip-vit-large-patch14/main/.augbench_snapshot.json" in out


def test_missing_dataset_root_fails_naming_it(tmp_path: Path) -> None:
    wf = _copy_workflow(tmp_path / "wf")
    laion = _fake_laion(tmp_path / "laion", n=4)
    missing = tmp_path / "no-such-imagenet"
    (wf / "site.yaml").write_text(yaml.safe_dump({"target": {"root": str(missing)}, "pool": {"embeddings": str(laion)}}))
    res = _smk(wf, "-n", "--configfile", "config/imagenet10.yaml", "site.yaml", timeout=120, env={"HF_HUB_OFFLINE": "0"})
    assert res.returncode != 0
    assert str(missing) in res.stdout + res.stderr and "target.root" in res.stdout + res.stderr


def _render_tree(root: Path, kinds: tuple[str, ...], per_class: int, seed: int) -> None:
    from augbench.toy.world import render

    r = random.Random(seed)
    for kind in kinds:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            render(kind, r, 32, pool=False)[0].save(root / kind / f"{kind}_{i}.png")


def _write_pool(pool: Path, layout: str, emb: np.ndarray, rows: list[dict], bounds: list[int]) -> None:
    """The pool as the real tools write it: clip-retrieval's img_emb/img_emb_N.npy + metadata/metadata_N.parquet with
    LAION's columns (no `key`, as in LAION's releases), or DataComp's <shard>.npz (savez: l14_img, b32_img, l14_txt) beside
    <shard>.parquet (uid, url, text)."""
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        meta = pd.DataFrame(rows[lo:hi])
        if layout == "clip_retrieval":
            (pool / "img_emb").mkdir(parents=True, exist_ok=True)
            (pool / "metadata").mkdir(parents=True, exist_ok=True)
            np.save(pool / f"img_emb/img_emb_{i}.npy", emb[lo:hi].astype(np.float16))
            meta.assign(similarity=0.31, punsafe=0.02, pwatermark=0.1, LICENSE="?", NSFW="UNLIKELY", width=32, height=32,
                        hash=np.arange(lo, hi)).to_parquet(pool / f"metadata/metadata_{i}.parquet")
        else:
            shard = pool / f"{i:08x}"
            pool.mkdir(parents=True, exist_ok=True)
            n = hi - lo
            np.savez(f"{shard}.npz", b32_img=np.zeros((n, 8), np.float16), l14_img=emb[lo:hi].astype(np.float16),
                     l14_txt=np.zeros((n, emb.shape[1]), np.float16))
            meta.rename(columns={"caption": "text"}).assign(uid=[f"{j:032x}" for j in range(lo, hi)], original_width=32,
                                                            clip_l14_similarity_score=0.3).to_parquet(f"{shard}.parquet")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["clip_retrieval", "datacomp"])
def test_precomputed_pool_embeddings_are_ingested_retrieved_and_fetched_by_url(
        tmp_path: Path, recording_server: tuple[str, Path, list[str]], tiny_sd: Path, layout: str) -> None:
    """A precomputed pool (three parts of unequal size, in the layout a real tool writes) is searched without embedding
    it; the retrieved images are downloaded by url over 127.0.0.1, content-checked against the stored embeddings; a pool
    copy of a test image is nominated by the merge and confirmed on its downloaded pixels."""
    from augbench.embed import Clip
    from augbench.specs import ClipSpec
    from augbench.target import TargetSpec, build_target
    from augbench.toy.clip_train import save_clip, train_clip
    from augbench.toy.world import render

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

    pool = tmp_path / "pool"
    _write_pool(pool, layout, Clip(clip).images(images), rows, [0, 40, 55, 91])

    wf = _copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    # n_aug 10 x overfetch 2 (a remote pool's default): 20 of the ~30 pool images per class are handed to fetch
    cfg.update({"dataset": "pre", "methods": ["real", "retrieval_image", "retrieval_text"], "n_aug": [10], "real_per_class": 2,
                "clip": {"model": str(clip)}, "diffusion": {"model": str(tiny_sd)},
                "pool": {"embeddings": str(pool), "layout": layout},
                "target": {"source": "imagefolder", **target},
                # this 3-step CLIP puts most images within cosine 0.995 of each other and the three prompts nearly on one
                # vector: near-duplicate removal off, and a low yield floor, since text mode may leave a class few images
                "retrieve": {"parts_per_block": 2, "margin": 3, "dedup_threshold": 1.0001},
                # PNG at the pool's size: a re-downloaded image has the embedded pixels (cosine 1 with the stored vector)
                "fetch": {"min_cosine": 0.99, "min_yield": 0.0},
                "download": {"timeout": 5, "retries": 0, "encode_format": "png", "encode_quality": 9}})
    (wf / "pre.yaml").write_text(yaml.safe_dump(cfg))

    targets = [f"results/pre/augment/{m}/images.tar" for m in ("retrieval_image", "retrieval_text")]
    res = _smk(wf, *targets, "--cores", "2", "--configfile", "pre.yaml", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    jobs = scheduled_jobs(res.stderr)
    assert "embed_pool" not in jobs and "download" not in jobs and jobs["search_block"] == 2 and jobs["retrieve"] == 2, jobs
    assert not (wf / "results/pre/embed/pool").exists() and not (wf / "results/pre/pool").exists()

    neighbors = pd.concat([pd.read_parquet(wf / f"results/pre/retrieve/{m}/neighbors.parquet") for m in ("image", "text")])
    urls = [r_["url"] for r_ in rows]
    assert len(neighbors) and set(neighbors["part"]) <= {0, 1, 2}
    offsets = np.array([0, 40, 55])
    assert (neighbors["url"].to_numpy() == np.array(urls)[offsets[neighbors["part"]] + neighbors["row"]]).all(), \
        "url and caption are read by (part, row) from the part's own metadata"
    leak_url = f"{base}/leak.png"
    assert leak_url in set(neighbors["url"]), "the planted copy is a candidate"
    assert len(neighbors.loc[neighbors["url"] == leak_url, "leak_suspects"].iloc[0]), "nominated by the merge"
    fetched = {p.rsplit("/", 1)[-1] for p in requests}
    assert {u.rsplit("/", 1)[-1] for u in neighbors["url"]} <= fetched, "every candidate url was downloaded over 127.0.0.1"
    assert len(requests) == len(set(requests)), "one url cache for both modes: no url downloaded twice"
    leaked_counts = 0
    for m in ("retrieval_image", "retrieval_text"):
        manifest = pd.read_parquet(wf / f"results/pre/augment/{m}/manifest.parquet")
        per_class = manifest.groupby("class").size()
        assert (per_class <= 10).all(), per_class
        assert m == "retrieval_text" or per_class.to_dict() == dict.fromkeys(kinds, 10), per_class
        assert leak_url not in set(manifest["url"])
        leaked_counts += json.loads((wf / f"results/pre/augment/{m}/fetch_stats.json").read_text())["by_reason"].get("leaked", 0)
    assert leaked_counts >= 1, "the copy was confirmed on its downloaded pixels and dropped"

    # a part whose metadata lost rows stops the run at the search, naming both files
    meta = next(p for p in sorted(pool.rglob("*.parquet")) if "1" in p.stem)
    table = pd.read_parquet(meta)
    table.iloc[:-2].to_parquet(meta)
    res = _smk(wf, *targets, "--cores", "2", "--configfile", "pre.yaml", "--forcerun", "search_block", timeout=600)
    assert res.returncode != 0
    emb = meta.with_suffix(".npz") if layout == "datacomp" else pool / "img_emb/img_emb_1.npy"
    assert str(emb) in res.stdout + res.stderr and str(meta) in res.stdout + res.stderr, res.stderr[-3000:]


def test_the_generator_sweep_plans_a_row_per_generator_and_guidance_scale(tmp_path: Path) -> None:
    """config/generators_imagenet10.yaml over the ImageNet config: four generators of four architectures, three with
    two guidance scales, one row each; every generator's hub model is fetched once by the local rule, and the generate
    jobs of a row carry its generator's model and settings."""
    wf = _copy_workflow(tmp_path / "wf")
    site = {"target": {"root": str(_fake_imagenet(tmp_path / "imagenet"))},
            "pool": {"embeddings": str(_fake_laion(tmp_path / "laion"))}}
    (wf / "site.yaml").write_text(yaml.safe_dump(site))
    res = _smk(wf, "-n", "-p", "--configfile", "config/imagenet10.yaml", "config/generators_imagenet10.yaml", "site.yaml",
               timeout=300, env={"HF_HUB_OFFLINE": "0", "AUGBENCH_FORBID_TOY": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = scheduled_jobs(res.stdout)
    variants = ["sd15-g2", "sd15-g7.5", "sdxl-g2", "sdxl-g7.5", "sd35-g2", "sd35-g4.5", "schnell"]
    generated = ["prompt_classname", "prompt_templates", "img2img", "cond_vectors_dm"]
    assert jobs["generate"] == 200 * len(generated) * len(variants), jobs  # 1,000 classes in blocks of 5
    assert jobs["personalize"] == 200 * 4, "one personalisation per generator, shared by its guidance scales"
    assert jobs["train"] == 3 * (2 + 2 * (2 + len(generated) * len(variants))), jobs
    assert jobs["fetch_model"] == 5, "CLIP and the four generators; diffusion.model is not used with generators"
    for repo in ("stable-diffusion-v1-5--stable-diffusion-v1-5", "stabilityai--stable-diffusion-xl-base-1.0",
                 "stabilityai--stable-diffusion-3.5-medium", "black-forest-labs--FLUX.1-schnell"):
        assert f"resources/hub/{repo}/main" in res.stdout, repo
    assert "CompVis--stable-diffusion-v1-4" not in res.stdout
    for v in variants:
        assert f"results/imagenet10/train/img2img@{v}/512/0/metrics.json" in res.stdout, v
    specs = {}
    for line in re.findall(r"augbench generate --model (\S+) .*?--spec '(\{.*?\})' --out \S+/generate/(\S+?)/block_0000 ",
                           res.stdout):
        specs[line[2]] = (line[0], json.loads(line[1]))
    model, spec = specs["prompt_classname@sd35-g4.5"]
    assert "stable-diffusion-3.5-medium" in model and spec["guidance_scale"] == 4.5 and spec["scheduler"] == "model"
    assert spec["method"] == "prompt_classname" and spec["steps"] == 28
    assert specs["img2img@schnell"][1]["steps"] == 4 and "--architecture flux" in res.stdout
