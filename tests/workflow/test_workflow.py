"""The workflow itself: config validation, lint, the tiny world end to end, and incrementality."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, scheduled_jobs, subprocess_env
from PIL import Image

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _copy_workflow(dest: Path) -> Path:
    """A copy of the workflow (code, rules, configs) in its own folder, so results/ stay inside the test."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "workflow", "config", "profiles", "envs", "src", "models"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    shutil.copy(REPO / "config.yaml", dest / "config.yaml")
    return dest


def _smk(cwd: Path, *args: str, timeout: int = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**subprocess_env(), **(env or {})})


@pytest.mark.parametrize(
    ("override", "named"),
    [({"world": {"shotz": 3}}, "shotz"), ({"seeds": "zero"}, "seeds"), ({"retrieve": {"margin": "many"}}, "margin"),
     ({"sweep_methods": ["retrieval_imag"]}, "retrieval_imag"), ({"n_aug": ["0x", 5]}, "'0x'"), ({"n_aug": ["0.1x"]}, "'0.1x'"),
     ({"device": "gpu"}, "device"), ({"methods": ["real", "prompt_classnam"]}, "prompt_classnam"),
     ({"generators": {"sd-15": {"model": "models/toy/diffusion"}}}, "'sd-15'"),
     ({"filters": {"best": {"methods": ["real"]}}}, "filters.best.methods"), ({"filters": {"be-st": {}}}, "'be-st'"),
     ({"filters": {"best": {"threshold": 0.2, "top_fraction": 0.5}}}, "filters.best: filter: give threshold or top_fraction")],
)
def test_bad_config_fails_before_any_job_naming_the_key(tmp_path: Path, override: dict, named: str) -> None:
    wf = _copy_workflow(tmp_path)
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    for key, value in override.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    (wf / "bad.yaml").write_text(yaml.safe_dump(cfg))
    res = _smk(wf, "-n", "--configfile", "bad.yaml")
    assert res.returncode != 0
    assert named in res.stdout + res.stderr
    assert not (wf / "results").exists()


def test_lint_is_clean() -> None:
    res = _smk(REPO, "--lint", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Lints for" not in res.stdout + res.stderr, res.stdout + res.stderr


def _data_uris(html: str) -> dict[str, bytes]:
    """The files a Snakemake HTML report embeds, by file name (data:...;filename=NAME;base64,...)."""
    uri = re.compile(r"data:[a-z/+]+;charset=utf8;filename=([^;]+);base64,([A-Za-z0-9+/=]+)")
    return {m.group(1): base64.b64decode(m.group(2)) for m in uri.finditer(html)}


def _check_report(wf: Path, report: pd.DataFrame) -> None:
    """Cost columns, the plot, one grid per augmentation method, and `snakemake --report` embedding them all."""
    out = wf / "results/tiny/report"
    cost = pd.read_csv(out / "cost_by_method.csv")  # measured: in a file of its own, so results.csv is reproducible
    assert list(cost[["method", "n_aug"]].itertuples(index=False)) == list(report[["method", "n_aug"]].itertuples(index=False))
    report = report.merge(cost, on=["method", "n_aug"])
    assert (report["cost_hours"] > 0).all() and report["gain_per_hour"].notna().all(), report
    assert report.loc[report["method"] == "real", "gain_per_hour"].item() == 0
    # generated and retrieval rows pay for their shared stages: dearer than training on real images alone
    baseline = report["method"].isin(["real", "real_x2"])
    assert report.loc[~baseline, "cost_hours"].min() > report.loc[baseline, "cost_hours"].max()
    augmented = sorted(set(report["method"]) - {"real", "real_x2"})
    assert sorted(p.stem for p in (out / "grids").glob("*.png")) == augmented
    for png in [out / "accuracy_vs_naug.png", *(out / "grids").glob("*.png")]:
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width > 200
    res = _smk(wf, "--configfile", "config/tiny.yaml", "--report", "results/tiny/report/report.html", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    embedded = _data_uris((out / "report.html").read_text())
    table = embedded["results.html"].decode()
    assert "<table" in table and all(m in table for m in report["method"])
    header = "method,generator,guidance,n_aug,n_aug_min,n_aug_median,seeds,top1_mean"
    assert embedded["results.csv"].decode().splitlines()[0].startswith(header)
    for name in ["accuracy_vs_naug.png", *(f"{m}.png" for m in augmented)]:
        assert embedded[name][:8] == b"\x89PNG\r\n\x1a\n", name
        assert Image.open(io.BytesIO(embedded[name])).size == Image.open(
            out / ("grids/" if name != "accuracy_vs_naug.png" else "") / name).size


@pytest.mark.slow
def test_tiny_world_end_to_end_and_incremental(tmp_path: Path) -> None:
    wf = _copy_workflow(tmp_path)
    res = _smk(wf, "--cores", "2", "--configfile", "config/tiny.yaml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    report = pd.read_csv(wf / "results/tiny/report/results.csv")
    assert set(report["method"]) == {"real", "real_x2", "retrieval_image", "retrieval_text", "prompt_classname",
                                     "textual_inversion_dm"}
    # the tiny world's figures sit near chance by design (3 classes, 5 steps: the shipped toy CLIP's test asserts learning);
    # here each is checked to be a count over its own images: top-1 over the 15 test images, fidelity over a set's images
    assert ((report["top1_mean"] * 15).round(3) % 1 == 0).all() and report["top1_mean"].between(0, 1).all(), report
    is_generated = report["method"].isin(["prompt_classname", "textual_inversion_dm"])
    for r in report[is_generated].itertuples():
        fid = json.loads((wf / f"results/tiny/augment/{r.method}/fidelity.json").read_text())
        assert fid["images"] == 15 and r.generation_fidelity == pytest.approx(fid["generation_fidelity"], abs=1e-6)  # csv: 6 places
        assert round(fid["generation_fidelity"] * 15, 3) % 1 == 0
    assert report.loc[~is_generated, "generation_fidelity"].isna().all()
    judged = json.loads((wf / "results/tiny/augment/prompt_classname/judge.json").read_text())
    assert report.loc[report["method"] == "prompt_classname", "judge_fidelity"].tolist() == pytest.approx([judged["judge_fidelity"]] * 2)
    assert judged["images"] == 3 * 5 and report.loc[~is_generated, "judge_fidelity"].isna().all()
    # image statistics of every augmented row, from its own job; the baselines add no image
    is_aug = ~report["method"].isin(["real", "real_x2"])
    for r in report[is_aug].itertuples():
        stats = json.loads((wf / f"results/tiny/augment/{r.method}/image_stats.json").read_text())
        assert stats["classes"] == 3 and r.diversity == pytest.approx(stats["diversity"], abs=1e-6) and r.diversity > 0
        assert r.kid_real == pytest.approx(stats["kid"], abs=1e-6)
    assert report.loc[~is_aug, ["diversity", "kid_real"]].isna().all().all()
    held = json.loads((wf / "results/tiny/judge/pool_heldout.json").read_text())  # toy world: it learnt pool images too
    assert held["images"] > 0 and held["judge_train_images"] > len(pd.read_parquet(wf / "results/tiny/world/target/train.parquet"))
    assert (f"its accuracy on {held['images']} held-out pool images of target kinds"
            in (wf / "results/tiny/report/results.md").read_text())
    assert sorted(report.loc[report["method"] == "retrieval_image", "n_aug"]) == [4, 5]  # "1x" = 4 shots, and 5
    assert (wf / "results/tiny/diffusion/model/model_index.json").exists()
    sched = json.loads((wf / "results/tiny/diffusion/model/scheduler/scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"  # the toy default; personalise and generate read it from here
    assert (wf / "results/tiny/personalize/textual_inversion_dm/block_0000/circle/pytorch_lora_weights.safetensors").exists()
    retrieval = report[report["method"].str.startswith("retrieval")]
    assert retrieval["retrieval_precision"].between(0, 1).all()
    for r in retrieval.itertuples():
        mode = r.method.split("_")[1]
        fetched = json.loads((wf / f"results/tiny/augment/{r.method}/fetch_stats.json").read_text())["leaked_removed"]
        assert r.leaked_removed == json.loads((wf / f"results/tiny/retrieve/{mode}/stats.json").read_text())["leaked_removed"] + fetched
    # every (method, n_aug, class) short of n_aug is a row of yield.csv, with the achieved count under n_aug
    yields = pd.read_csv(wf / "results/tiny/report/yield.csv")
    assert list(yields.columns) == ["method", "n_aug", "class", "achieved", "missing", "reasons", "leaked_merge", "leaked_fetch"]
    assert (yields["achieved"] < yields["n_aug"]).all() and "Yield: " in (wf / "results/tiny/report/results.md").read_text()
    # exact search ran as one job per block of pool parts (parts_per_block 1, two parts), merged per mode
    assert sorted(p.name for p in (wf / "results/tiny/retrieve/search").glob("*.npz")) == ["00000.npz", "00001.npz"]
    for mode in ("image", "text"):
        st = json.loads((wf / f"results/tiny/retrieve/{mode}/stats.json").read_text())
        neighbors = pd.read_parquet(wf / f"results/tiny/retrieve/{mode}/neighbors.parquet")
        assert st["need_per_class"] == 5 and st["kept"] == len(neighbors)
        assert not neighbors.duplicated(["part", "row"]).any(), "a pool image is kept by one class only"
        # a served toy file is named by its path and content hash (no loopback port: the same bytes on every run)
        assert set(neighbors["part"]) <= {0, 1} and neighbors["url"].str.fullmatch(r"pool/images/\d+\.png#sha256=[0-9a-f]{16}").all()
    rows = report[report["method"] == "retrieval_image"]
    assert (rows["n_aug_min"] <= rows["n_aug"]).all() and (rows["n_aug_median"] <= rows["n_aug"]).all()
    stats = json.loads((wf / "results/tiny/pool/shards/00000_stats.json").read_text())
    assert stats["successes"] > 0 and stats["cached"] == 0 and stats["requested"] == stats["urls"]
    _check_report(wf, report)

    # nothing to do after a complete run
    res = _smk(wf, "-n", "--configfile", "config/tiny.yaml")
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr, res.stdout

    # a retrieve setting schedules retrieve and what depends on it, nothing upstream, no baselines
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["retrieve"]["dedup_threshold"] = 0.99
    (wf / "changed.yaml").write_text(yaml.safe_dump(cfg))
    res = _smk(wf, "-n", "--configfile", "changed.yaml")
    assert res.returncode == 0, res.stderr
    jobs = scheduled_jobs(res.stdout)
    assert jobs == {"retrieve": 2, "fetch_retrieved": 2, "decode_augment": 2, "image_stats": 2, "train": 4, "report": 1,
                    "all": 1}, res.stdout
    # the search margin changes k: the search blocks too
    cfg["retrieve"] = {**cfg["retrieve"], "dedup_threshold": 0.995, "margin": 3}
    (wf / "changed.yaml").write_text(yaml.safe_dump(cfg))
    jobs = scheduled_jobs(_smk(wf, "-n", "--configfile", "changed.yaml").stdout)
    assert jobs == {"search_block": 2, "retrieve": 2, "fetch_retrieved": 2, "decode_augment": 2, "image_stats": 2, "train": 4,
                    "report": 1,
                    "all": 1}, jobs
    # how jobs are scheduled (tiles, threads, processes) is not content: nothing to do
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["retrieve"].update(tile_rows=2048, threads=2)
    cfg.setdefault("fetch", {})["threads"] = 3
    cfg["index"]["threads"] = 2
    cfg["download"].update(processes_count=2, thread_count=4)
    cfg["clip"]["train"]["threads"] = 1
    cfg["diffusion"]["train"]["threads"] = 2
    for section in ("personalize", "generate", "train"):
        cfg[section]["threads"] = 2
    cfg["personalize"]["gradient_checkpointing"] = True  # memory options: same results, passed as arguments
    cfg["generate"]["offload"] = "model"
    cfg["retrieve"]["gpu"] = True  # the search and merge become rules search_block_gpu / retrieve_gpu: same outputs
    cfg["device"] = "cpu"
    (wf / "changed.yaml").write_text(yaml.safe_dump(cfg))
    res = _smk(wf, "-n", "--configfile", "changed.yaml")
    assert "Nothing to be done" in res.stdout + res.stderr, res.stdout
    # parts_per_block is the one search setting that names outputs (a file per block): the search and its merge run
    # again, and what reads the merge (same bytes, new files: Snakemake cannot know), never the embeddings or downloads
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["retrieve"]["parts_per_block"] = 2
    (wf / "changed.yaml").write_text(yaml.safe_dump(cfg))
    jobs = scheduled_jobs(_smk(wf, "-n", "--configfile", "changed.yaml").stdout)
    assert jobs["search_block"] == 1 and jobs["retrieve"] == 2 and not {"embed_pool", "download", "queries"} & set(jobs), jobs

    # a personalisation setting: only the personalised method's chain (its spec is a param Snakemake records)
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["personalize"]["steps"] = 4
    (wf / "changed.yaml").write_text(yaml.safe_dump(cfg))
    jobs = scheduled_jobs(_smk(wf, "-n", "--configfile", "changed.yaml").stdout)
    # (one block of class_block classes per method: one personalize and one generate job for the three classes)
    assert jobs == {"personalize": 1, "generate": 1, "collect_generated": 1, "decode_augment": 1, "judge_generated": 1,
                    "image_stats": 1, "train": 2, "report": 1, "all": 1}, jobs

    # a mixing setting (added images' share of each batch) reruns the training runs that have added images, nothing else
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["train"]["aug_share"] = 0.5
    (wf / "changed.yaml").write_text(yaml.safe_dump(cfg))
    jobs = scheduled_jobs(_smk(wf, "-n", "--configfile", "changed.yaml").stdout)
    assert jobs == {"train": 8, "report": 1, "all": 1}, jobs

    # a sampling setting reruns generation of every generated method; a report setting only the report
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["generate"]["guidance_scale"] = 3.0
    cfg["report"] = {**cfg["report"], "grid_images": 3}
    (wf / "changed.yaml").write_text(yaml.safe_dump(cfg))
    jobs = scheduled_jobs(_smk(wf, "-n", "--configfile", "changed.yaml").stdout)
    assert jobs == {"generate": 2, "collect_generated": 2, "decode_augment": 2, "judge_generated": 2, "image_stats": 2,
                    "train": 4, "report": 1, "all": 1}, jobs
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["report"] = {**cfg["report"], "grid_images": 3}
    (wf / "changed.yaml").write_text(yaml.safe_dump(cfg))
    jobs = scheduled_jobs(_smk(wf, "-n", "--configfile", "changed.yaml").stdout)
    assert jobs == {"report": 1, "all": 1}, jobs

    # the same jobs run again from their inputs (caches removed), on the same machine: the same bytes. One retrieval and
    # one personalised chain, from the search and the personalisation to the trained weights (a whole second run took
    # 200 s of the suite; the results table is a function of these weights)
    chains = ["retrieve/image/neighbors.parquet", "retrieve/text/neighbors.parquet", "train/retrieval_image/5/0/model.pt",
              "personalize/textual_inversion_dm/block_0000/circle/pytorch_lora_weights.safetensors",
              "generate/textual_inversion_dm/block_0000/square/manifest.parquet", "train/textual_inversion_dm/5/0/model.pt"]
    first = {f: (wf / "results/tiny" / f).read_bytes() for f in chains}
    for cache in ("personalize/textual_inversion_dm/cache", "generate/textual_inversion_dm/cache"):
        shutil.rmtree(wf / "results/tiny" / cache)
    targets = [f"results/tiny/{f}" for f in chains if f.endswith(".pt")] + ["results/tiny/retrieve/text/neighbors.parquet"]
    res = _smk(wf, *targets, "--cores", "2", "--configfile", "config/tiny.yaml", "--forcerun", "search_block", "personalize")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    rerun = scheduled_jobs(res.stderr)
    assert rerun["search_block"] == 2 and rerun["personalize"] == 1 and rerun["train"] == 2, rerun
    for f in chains:
        assert (wf / "results/tiny" / f).read_bytes() == first[f], f

    _content_keyed_caches(wf)


def _members(path: Path) -> dict[str, bytes]:
    """The images of a shard, or of a manifest with pointers, by key."""
    from augbench.shards import iter_shard, pointed_images

    return pointed_images(path) if path.suffix == ".parquet" else {s.key: s.image for s in iter_shard(path)}


def _content_keyed_caches(wf: Path) -> None:
    """Caches that outlive their outputs hand back nothing made from other inputs."""
    from augbench.imaging import decode

    # a retrained CLIP under an unchanged diffusion spec: a new text encoder in the diffusion model, new images
    # (a cache keyed by the model's spec handed back the old model's images byte for byte)
    block = "results/tiny/generate/prompt_classname/block_0000"
    gen = f"{block}/circle/manifest.parquet"
    old = _members(wf / gen)
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["clip"]["train"]["steps"] = 21
    (wf / "changed.yaml").write_text(yaml.safe_dump(cfg))
    res = _smk(wf, block, "--cores", "2", "--configfile", "changed.yaml")  # targets first: --configfile takes several values
    assert res.returncode == 0, res.stderr[-3000:]
    new = _members(wf / gen)
    assert new.keys() == old.keys() and all(new[k] != old[k] for k in new), "a retrained model reused cached images"
    assert "not used: model changed" in (wf / "logs/tiny/generate/prompt_classname/block_0000.log").read_text()

    # another world under the same keys and file names: no image of the old pool in the new shards
    shard = "results/tiny/pool/shards/00000.tar"
    table = pd.read_parquet(wf / "results/tiny/world/pool/pool.parquet").set_index("key")
    before = {k: decode(str(wf / "results/tiny/world" / f), 32).astype(float) for k, f in table["file"].items()}
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["world"]["seed"] = 7
    (wf / "changed.yaml").write_text(yaml.safe_dump(cfg))
    res = _smk(wf, shard, "--cores", "2", "--configfile", "changed.yaml")  # targets first: --configfile takes several values
    assert res.returncode == 0, res.stderr[-3000:]
    pool = pd.read_parquet(wf / "results/tiny/world/pool/pool.parquet").set_index("key")
    samples = _members(wf / shard)
    assert len(samples) > 50
    for key, data in samples.items():  # each image is the new world's file (up to JPEG loss), never the old one's
        got = decode(data, 32).astype(float)
        want = decode(str(wf / "results/tiny/world" / pool.loc[key, "file"]), 32).astype(float)
        assert abs(got - want).mean() < 0.5 * abs(got - before[key]).mean(), key

    # another download size: the shards are re-downloaded at that size, not assembled from the cached 32 px images
    cfg["download"]["image_size"] = 24
    (wf / "changed.yaml").write_text(yaml.safe_dump(cfg))
    res = _smk(wf, shard, "--cores", "2", "--configfile", "changed.yaml")  # targets first: --configfile takes several values
    assert res.returncode == 0, res.stderr[-3000:]
    sizes = {Image.open(io.BytesIO(d)).size for d in _members(wf / shard).values()}
    assert sizes == {(24, 24)}, sizes


@pytest.mark.slow
def test_real_path_stable_diffusion_folder_personalise_and_generate(tmp_path: Path) -> None:
    """A saved tiny StableDiffusionPipeline stands in for Stable Diffusion: no pretrain_diffusion, from_pretrained on a folder."""
    from conftest import build_tiny_sd

    wf = _copy_workflow(tmp_path)
    sd = build_tiny_sd(tmp_path / "stable-diffusion-v1-4")
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["world"]["n_classes"] = 2
    cfg["diffusion"] = {"model": str(sd)}
    cfg["methods"] = ["real", "textual_inversion", "cond_vectors_dm", "img2img"]
    cfg["n_aug"] = [3]
    (wf / "sd.yaml").write_text(yaml.safe_dump(cfg))
    cfg["class_block"] = 1  # one block per class: two jobs of each rule per method
    (wf / "sd.yaml").write_text(yaml.safe_dump(cfg))
    targets = [f"results/tiny/generate/{m}/block_{b:04d}" for m in cfg["methods"][1:] for b in (0, 1)]
    res = _smk(wf, *targets, "--cores", "2", "--configfile", "sd.yaml")  # --configfile takes several values: targets first
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert not (wf / "results/tiny/diffusion").exists(), "a named model must not trigger toy pretraining"
    for b, cls in enumerate(("circle", "square")):
        ti = wf / f"results/tiny/personalize/textual_inversion/block_{b:04d}/{cls}"
        assert (ti / "learned_embeds.safetensors").exists()
        assert (wf / f"results/tiny/personalize/cond_vectors_dm/block_{b:04d}/{cls}/pytorch_lora_weights.safetensors").exists()
        for method in cfg["methods"][1:]:
            manifest = pd.read_parquet(wf / f"results/tiny/generate/{method}/block_{b:04d}/{cls}/manifest.parquet")
            assert len(manifest) == 3 and set(manifest["class"]) == {cls}
    log = (wf / "logs/tiny/generate/textual_inversion/block_0000.log").read_text()
    assert str(sd) in log
    # both classes ran as separate jobs of each rule
    jobs = scheduled_jobs(_smk(wf, *targets, "-n", "--forceall", "--configfile", "sd.yaml").stdout)
    assert jobs["personalize"] == 4 and jobs["generate"] == 6, jobs


@pytest.mark.slow
def test_ann_index_path_and_query_command(tmp_path: Path) -> None:
    """retrieve.search: index builds the sharded index (train once, one add per part, merge on disk), measures its
    recall on the real queries, retrieves through it; `augbench query` prints what the pool holds for a prompt."""
    wf = _copy_workflow(tmp_path)
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["retrieve"]["search"] = "index"
    cfg["index"] = {"factory": "IVF4,Flat", "nprobe": 4, "train_size": 200, "recall_sample": 50}
    (wf / "ann.yaml").write_text(yaml.safe_dump(cfg))
    targets = [f"results/tiny/retrieve/{m}/neighbors.parquet" for m in ("image", "text")]
    res = _smk(wf, *targets, "--cores", "2", "--configfile", "ann.yaml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    jobs = scheduled_jobs(res.stderr)
    assert jobs["index_train"] == 1 and jobs["index_add"] == 2 and jobs["index_merge"] == 1 and jobs["index_search"] == 2, jobs
    assert "search_block" not in jobs
    infos = json.loads((wf / "results/tiny/index/index_infos.json").read_text())
    assert infos["size"] == len(pd.read_parquet(wf / "results/tiny/embed/pool/metadata/metadata_00000.parquet")) + len(
        pd.read_parquet(wf / "results/tiny/embed/pool/metadata/metadata_00001.parquet"))
    assert infos["recall_at_10"] == 1.0, infos  # nprobe = nlist: the IVF scans every list
    for mode in ("image", "text"):
        neighbors = pd.read_parquet(wf / f"results/tiny/retrieve/{mode}/neighbors.parquet")
        assert len(neighbors) and not neighbors.duplicated(["part", "row"]).any()

    pool = [str(p) for p in sorted((wf / "results/tiny/embed/pool/img_emb").glob("*.npy"))]
    meta = [str(p) for p in sorted((wf / "results/tiny/embed/pool/metadata").glob("*.parquet"))]
    for extra in ([], ["--index", str(wf / "results/tiny/index/pool.index"), "--nprobe", "4"]):
        out = subprocess.run([sys.executable, "-m", "augbench", "query", "--text", "a photo of a circle", "-k", "5",
                              "--model", str(wf / "results/tiny/clip/model"), "--pool-emb", *pool, "--pool-meta", *meta,
                              "--pool-names", "0", "1", *extra], capture_output=True, text=True, env=subprocess_env(), timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        lines = [ln for ln in out.stdout.splitlines() if "pool/images/" in ln]  # served toy files: path + content hash
        assert len(lines) == 5, out.stdout
