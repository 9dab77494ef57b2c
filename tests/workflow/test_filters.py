"""Filtered rows through the workflow, on the real path: a Stable Diffusion folder and a real-architecture CLIP, built
tiny, non-square JPEG photos served on 127.0.0.1, the toy code forbidden (AUGBENCH_FORBID_TOY=1).

A CLIP filter on a generated and a retrieval method and a classifier filter on the generated one become rows of the
table; generated candidates extend their row's chunks (no image made twice); the yield is reported; removing the
filters leaves every other row's jobs as they were, and changing a filter reruns its row's filtering and training only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import scheduled_jobs
from test_real_architectures import KINDS, photo_target, real_path_inputs
from test_workflow import _copy_workflow, _smk

pytestmark = pytest.mark.slow
N_AUG = 2
FILTERED = ["prompt_classname+best", "retrieval_text+best", "prompt_classname+real"]


def test_filtered_rows_keep_the_best_candidates_and_leave_other_rows_alone(
        tmp_path: Path, recording_server: tuple[str, Path, list[str]]) -> None:
    data, urls, clip, sd = real_path_inputs(tmp_path, recording_server)
    wf = _copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg.update({"dataset": "filt", "methods": ["real", "retrieval_text", "prompt_classname"], "n_aug": [N_AUG],
                "sweep_methods": None, "real_per_class": 2,
                "target": photo_target(data), "pool": {"urls": str(urls), "parts": 1}, "clip": {"model": str(clip)},
                "diffusion": {**cfg["diffusion"], "model": str(sd), "architecture": "sd"},
                "generate": {**cfg.get("generate", {}), "resolution": 32},
                "report": {**cfg.get("report", {}), "judge": False},
                "filters": {"best": {"score": "clip", "top_fraction": 0.5, "methods": ["retrieval_text", "prompt_classname"]},
                            "real": {"score": "classifier", "threshold": 0.0, "overgenerate": 1.5,
                                     "methods": ["prompt_classname"]}}})
    (wf / "filt.yaml").write_text(yaml.safe_dump(cfg))
    forbid = {"AUGBENCH_FORBID_TOY": "1"}
    res = _smk(wf, "--cores", "2", "--configfile", "filt.yaml", timeout=1500, env=forbid)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    out = wf / "results/filt"

    results = pd.read_csv(out / "report/results.csv").set_index("method")
    assert sorted(results.index) == sorted(["real", "retrieval_text", "prompt_classname", *FILTERED])
    assert results["top1_mean"].notna().all()
    assert results.loc["prompt_classname+best", "generation_fidelity"] >= 0
    cost = pd.read_csv(out / "report/cost_by_method.csv").set_index("method")
    # a filtered row pays its row's generation too (the images it chose from), and its own filter
    assert cost.loc["prompt_classname+best", "cpu_hours"] > cost.loc["prompt_classname", "cpu_hours"]

    for row, n_cand in (("prompt_classname+best", 4), ("retrieval_text+best", 4), ("prompt_classname+real", 3)):
        cands = pd.read_parquet(out / f"augment/{row}/candidates/manifest.parquet")
        kept = pd.read_parquet(out / f"augment/{row}/manifest.parquet")
        stats = (out / f"augment/{row}/filter.json").read_text()
        assert (cands.groupby("class").size() <= n_cand).all() and len(cands) > len(kept), row
        assert set(kept["key"]) <= set(cands["key"]) and (kept.groupby("class").size() <= N_AUG).all(), row
        assert f'"n_aug": {N_AUG}' in stats
        for cls, group in kept.groupby("class"):  # ranks renumbered, in candidate order
            assert group["rank"].tolist() == list(range(len(group))), (row, cls)
            assert sorted(group["candidate_rank"]) == group["candidate_rank"].tolist(), (row, cls)
    # the generated candidates are the row's own first images and more: the row's chunk, one file (hard links)
    for cls in KINDS:
        row_chunk = out / f"generate/prompt_classname/block_0000/{cls}/chunks/00000.tar"
        filtered_chunk = out / f"generate/prompt_classname+best/block_0000/{cls}/chunks/00000.tar"
        assert os.path.samefile(row_chunk, filtered_chunk), cls
    row_keys = pd.read_parquet(out / "augment/prompt_classname/manifest.parquet")["key"]
    best_cands = pd.read_parquet(out / "augment/prompt_classname+best/candidates/manifest.parquet")
    assert set(row_keys) <= set(best_cands["key"])
    md = (out / "report/results.md").read_text()
    assert "Filter: prompt_classname+best: clip top 50%: kept" in md and "Filter: prompt_classname+real: classifier" in md

    # without the filters, the generated and baseline rows' jobs are as they were; the query mode a filter widened (more
    # neighbours per class) searches again, and only its row trains again
    plain = {k: v for k, v in cfg.items() if k != "filters"}
    (wf / "plain.yaml").write_text(yaml.safe_dump(plain))
    listing = _smk(wf, "-n", "-p", "--configfile", "plain.yaml", env=forbid).stdout
    dry = scheduled_jobs(listing)
    assert not set(dry) & {"generate", "personalize", "collect_generated", "train_judge"} and "report" in dry, dry
    outputs = " ".join(re.findall(r"^\s*output: (.*)$", listing, re.M))
    assert set(re.findall(r"/train/([^/\s]+)/\d+/\d+/metrics.json", outputs)) <= {"retrieval_text"}

    # a filter's threshold changes: its row filters and trains again; nothing is generated, fetched or collected
    cfg["filters"]["real"]["threshold"] = 0.3
    (wf / "filt.yaml").write_text(yaml.safe_dump(cfg))
    listing = _smk(wf, "-n", "-p", "--configfile", "filt.yaml", env=forbid).stdout
    dry = scheduled_jobs(listing)
    assert set(dry) <= {"filter_augment", "decode_augment", "image_stats", "train", "report", "all"}, dry
    assert dry.get("filter_augment") == 1 and dry.get("train") == 1, dry
    outputs = " ".join(re.findall(r"^\s*output: (.*)$", listing, re.M))
    assert set(re.findall(r"/train/([^/\s]+)/\d+/\d+/metrics.json", outputs)) == {"prompt_classname+real"}
