"""A real-style run (an ImageFolder target, a url pool served on 127.0.0.1) whose inputs hold what web data holds:
truncated and empty files, HTML named .jpg, a header claiming 60000 x 60000 pixels, and images in every colour mode.
The run completes through the report; each file is decoded or skipped with a counted reason that shows in the results."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
import yaml
from oddities import oddities
from test_workflow import _copy_workflow, _smk

pytestmark = pytest.mark.slow
KINDS = ("circle", "square", "triangle")


def test_broken_and_unusual_files_are_decoded_or_counted_through_the_report(
        tmp_path: Path, recording_server: tuple[str, Path, list[str]]) -> None:
    from augbench.toy.world import render

    base, served, _ = recording_server
    odd = oddities()
    broken = {n for n, (_, v) in odd.items() if v != "ok"}
    # the target: rendered classes, and every oddity planted in the first class's folder
    data = tmp_path / "photos"
    r = random.Random(0)
    for kind in KINDS:
        (data / "train" / kind).mkdir(parents=True)
        for i in range(12):  # 3 train + 3 train_extra + 4 val + 2 test (the target refuses a class short of its splits)
            render(kind, r, 32, pool=False)[0].save(data / "train" / kind / f"{kind}_{i:02d}.png")
    for name, (payload, _) in odd.items():
        (data / "train" / "circle" / f"odd_{name}").write_bytes(payload)
    # the pool: rendered, captioned images served over HTTP, the oddities among them, and a dead link
    rows = []
    for i in range(240):
        kind = (*KINDS, "hexagon")[i % 4]
        render(kind, r, 32, pool=True)[0].save(served / f"{i}.png")
        rows.append({"url": f"{base}/{i}.png", "caption": f"a photo of a {kind}"})
    for name, (payload, _) in odd.items():
        (served / f"odd_{name}").write_bytes(payload)
        rows.append({"url": f"{base}/odd_{name}", "caption": "a photo of a circle"})
    rows.append({"url": f"{base}/gone.jpg", "caption": "a photo of a circle"})
    pd.DataFrame(rows).to_parquet(tmp_path / "urls.parquet")

    wf = _copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg.update({"dataset": "odd", "methods": ["real", "retrieval_image", "textual_inversion"], "n_aug": [4], "real_per_class": 3,
                "sweep_methods": None,
                "target": {"source": "imagefolder", "root": str(data), "train_dir": "train", "test_dir": None,
                           "class_list": "folders", "train_fraction": None, "train_per_class": 3, "val_per_class": 4,
                           "test_per_class": None},
                "pool": {"urls": str(tmp_path / "urls.parquet"), "parts": 2},
                "fetch": {"min_yield": 0.0}})
    (wf / "odd.yaml").write_text(yaml.safe_dump(cfg))
    res = _smk(wf, "--cores", "2", "--configfile", "odd.yaml", timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    out = wf / "results/odd"
    # where each planted file landed in the target's splits, and what the jobs reading them counted
    planted = {}
    for split in ("train", "train_extra", "val", "test"):
        for p in pd.read_parquet(out / f"dataset/target/{split}.parquet")["path"]:
            if Path(p).name.startswith("odd_"):
                planted[Path(p).name[4:]] = split
    assert set(planted) == set(odd), "every oddity is listed in a split"
    for split in ("train", "val", "test"):  # the splits the workflow embeds
        meta = json.loads((out / f"embed/target/img_emb/{split}.npy.meta.json").read_text())
        want: dict[str, int] = {}
        for name, s in planted.items():
            if s == split and odd[name][1] != "ok":
                want[odd[name][1]] = want.get(odd[name][1], 0) + 1
        assert meta["stats"]["skipped_by_reason"] == dict(sorted(want.items())), (split, meta["stats"])
    results = pd.read_csv(out / "report/results.csv").set_index("method")
    n_train_broken = sum(1 for n, s in planted.items() if s == "train" and n in broken)
    n_test_broken = sum(1 for n, s in planted.items() if s == "test" and n in broken)
    assert (results["skipped_train"] == n_train_broken).all() and (results["skipped_test"] == n_test_broken).all(), results
    assert n_train_broken + n_test_broken > 0, "the split put no broken file where training reads it: change the seed"
    md = (out / "report/results.md").read_text()
    assert (f"train {n_train_broken}" in md) if n_train_broken else (f"test {n_test_broken}" in md), md

    # the pool: img2dataset counts what it could not decode or fetch, and the run goes on
    failed = {}
    for part in ("00000", "00001"):
        st = json.loads((out / f"pool/shards/{part}_stats.json").read_text())
        for reason, n in st["failures_by_reason"].items():
            failed[reason] = failed.get(reason, 0) + n
    assert failed.get("http_404") == 1 and failed.get("undecodable_image", 0) >= len(broken) - 1, failed
    assert (out / "report/grids/retrieval_image.png").exists() and (out / "report/grids/textual_inversion.png").exists()
