"""The generator axis, end to end: two generators of different architectures (a Stable Diffusion folder with two
guidance scales, an SDXL folder), tiny random instances of the real classes, through to results.csv with one row per
(method, generator, guidance); then a changed setting of one generator reruns only that generator's jobs.

On non-square JPEG photos, with a real-architecture CLIP and the toy code forbidden (AUGBENCH_FORBID_TOY=1)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from architectures import build
from conftest import scheduled_jobs
from PIL import Image
from test_real_architectures import KINDS, photo_target, real_path_inputs
from test_workflow import _copy_workflow, _smk

from augbench.shards import pointed_images

pytestmark = pytest.mark.slow
N_AUG = 2
ROWS = ["real", "prompt_classname@sd15-g2", "prompt_classname@sd15-g5", "prompt_classname@xl",
        "img2img@sd15-g2", "img2img@sd15-g5", "img2img@xl"]


def test_two_generators_of_different_architectures_are_rows_of_one_table(
        tmp_path: Path, recording_server: tuple[str, Path, list[str]]) -> None:
    data, urls, clip, sd = real_path_inputs(tmp_path, recording_server)
    xl = build("sdxl", tmp_path / "xl")
    wf = _copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg.update({"dataset": "gens", "methods": ["real", "prompt_classname", "img2img"], "n_aug": [N_AUG],
                "sweep_methods": None, "real_per_class": 2,
                "target": photo_target(data), "pool": {"urls": str(urls), "parts": 1}, "clip": {"model": str(clip)},
                "generate": {**cfg.get("generate", {}), "resolution": 32},
                "report": {**cfg.get("report", {}), "judge": False},  # the judge is the end-to-end test's
                "generators": {"sd15": {"model": str(sd), "architecture": "sd", "guidance_scale": [2, 5]},
                               "xl": {"model": str(xl), "architecture": "sdxl", "scheduler": "euler", "steps": 2,
                                      "guidance_scale": 3}}})
    (wf / "gens.yaml").write_text(yaml.safe_dump(cfg))
    forbid = {"AUGBENCH_FORBID_TOY": "1"}
    res = _smk(wf, "--cores", "2", "--configfile", "gens.yaml", timeout=1500, env=forbid)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    out = wf / "results/gens"

    results = pd.read_csv(out / "report/results.csv")
    assert sorted(results["method"]) == sorted(ROWS), results
    gen = results.set_index("method")
    assert gen.loc["prompt_classname@sd15-g5", "generator"] == "sd15" and gen.loc["prompt_classname@sd15-g5", "guidance"] == 5
    assert gen.loc["img2img@xl", "generator"] == "xl" and gen.loc["img2img@xl", "guidance"] == 3
    assert pd.isna(gen.loc["real", "generator"]) and pd.isna(gen.loc["real", "guidance"])
    assert results["top1_mean"].notna().all()
    cost = pd.read_csv(out / "report/cost_by_method.csv")
    assert sorted(cost["method"]) == sorted(ROWS) and set(cost["generator"].dropna()) == {"sd15", "xl"}
    assert all((out / f"report/grids/{r}.png").exists() for r in ROWS if r != "real")

    images = {}
    for row in ROWS[1:]:
        manifest = pd.read_parquet(out / f"augment/{row}/manifest.parquet")
        assert (manifest.groupby("class").size().reindex(list(KINDS)) == N_AUG).all(), row
        images[row] = pointed_images(out / f"augment/{row}/manifest.parquet")
        sizes = {Image.open(io.BytesIO(b)).size for b in images[row].values()}
        assert sizes == {(32, 32)}, (row, sizes)
    # the same seeds on every generator (the spec names the method, not the row): the pictures differ by generator
    # and by guidance, not because the noise was drawn anew
    assert set(images["prompt_classname@xl"]) == set(images["prompt_classname@sd15-g2"])
    for a, b in (("prompt_classname@xl", "prompt_classname@sd15-g2"), ("prompt_classname@sd15-g2", "prompt_classname@sd15-g5")):
        assert all(images[a][k] != images[b][k] for k in images[a]), (a, b)

    # one generator's setting changes: only its rows' jobs run again; the other generator's and the baseline's do not
    cfg["generators"]["xl"]["steps"] = 3
    (wf / "gens.yaml").write_text(yaml.safe_dump(cfg))
    listing = _smk(wf, "-n", "-p", "--configfile", "gens.yaml", env=forbid).stdout
    dry = scheduled_jobs(listing)
    assert dry.get("generate") == 2 and dry.get("train") == 2 and dry.get("collect_generated") == 2, dry
    assert set(dry) == {"generate", "collect_generated", "decode_augment", "image_stats", "train", "report", "all"}, dry
    outputs = " ".join(re.findall(r"^\s*output: (.*)$", listing, re.M))  # what the scheduled jobs write
    assert set(re.findall(r"/generate/([^/\s]+)/block_0000", outputs)) == {"prompt_classname@xl", "img2img@xl"}
    assert set(re.findall(r"/train/([^/\s]+)/\d+/\d+/metrics.json", outputs)) == {"prompt_classname@xl", "img2img@xl"}


def test_a_generator_that_cannot_run_a_method_is_refused_at_parse_time(tmp_path: Path) -> None:
    wf = _copy_workflow(tmp_path / "wf")
    pixart = build("pixart_sigma", tmp_path / "pixart")
    cfg = {"methods": ["real", "prompt_classname", "img2img"],
           "generators": {"toy": {"model": "models/toy/diffusion"}, "pixart": {"model": str(pixart)}}}
    (wf / "gens.yaml").write_text(yaml.safe_dump(cfg))
    res = _smk(wf, "-n", "--configfile", "config/tiny.yaml", "gens.yaml")
    assert res.returncode != 0
    assert "generators.pixart: refused before anything runs:\n  img2img on generators.pixart (pixart_sigma): diffusers " \
           "has no image-to-image pipeline for pixart_sigma (PixArtSigmaPipeline)" in res.stdout + res.stderr
    assert "Job stats" not in res.stdout
