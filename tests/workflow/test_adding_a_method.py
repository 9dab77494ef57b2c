"""A method is one registry row: a throwaway row is planned by the workflow with no other edit."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from conftest import scheduled_jobs
from test_workflow import _copy_workflow, _smk

ROW = '    Method("img2img_strong", "generated", prompt="classname", from_real=True, generate={"strength": 0.9}),\n'


def test_a_registry_row_is_all_a_new_method_needs(tmp_path: Path) -> None:
    wf = _copy_workflow(tmp_path)
    registry = wf / "src/augbench/methods.py"
    text = registry.read_text()
    anchor = '    Method("cond_vectors_dm",'
    assert text.count(anchor) == 1
    registry.write_text(text.replace(anchor, ROW + anchor))
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["methods"] = [*cfg["methods"], "img2img", "img2img_strong"]
    (wf / "config/tiny.yaml").write_text(yaml.safe_dump(cfg))
    res = _smk(wf, "-n", "-p", "--configfile", "config/tiny.yaml", env={"PYTHONPATH": str(wf / "src")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = scheduled_jobs(res.stdout)
    # as many generate jobs as img2img's (one per block of classes each), plus its collect and training runs
    assert jobs["generate"] == 4 and jobs["collect_generated"] == 4
    assert "results/tiny/train/img2img_strong/5/0/metrics.json" in res.stdout
    assert "results/tiny/personalize/img2img_strong" not in res.stdout  # it learns nothing per class
    # its spec carries the strength the row fixes; img2img keeps the config's
    specs = {m: set(re.findall(r'"strength":([0-9.]+)', "\n".join(
        line for line in res.stdout.splitlines() if f"/generate/{m}/block_" in line and "augbench generate" in line)))
             for m in ("img2img", "img2img_strong")}
    assert specs == {"img2img": {str(cfg.get("generate", {}).get("strength", 0.5))}, "img2img_strong": {"0.9"}}


def test_a_method_not_in_the_registry_stops_the_parse_naming_it(tmp_path: Path) -> None:
    wf = _copy_workflow(tmp_path)
    cfg = yaml.safe_load((wf / "config/tiny.yaml").read_text())
    cfg["methods"] = [*cfg["methods"], "img2img_strong"]
    (wf / "config/tiny.yaml").write_text(yaml.safe_dump(cfg))
    res = _smk(wf, "-n", "--configfile", "config/tiny.yaml")
    assert res.returncode != 0
    assert "methods names ['img2img_strong'], which are no methods" in res.stdout + res.stderr
