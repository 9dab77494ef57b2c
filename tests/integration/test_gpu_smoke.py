"""The GPU check cannot rot: the same script runs here with tiny models on the CPU, every check, and must exit 0 with
every figure; a check that fails makes the script exit non-zero (checked by breaking one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, subprocess_env


def _run(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts/gpu_smoke.py"), str(out), "--tiny", "--device", "cpu", *extra],
                          capture_output=True, text=True, timeout=900, env={**subprocess_env(), **(env or {})})


def test_every_check_of_the_gpu_script_runs_on_the_cpu_with_tiny_models(tmp_path: Path) -> None:
    res = _run(tmp_path / "out")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads((tmp_path / "out/gpu_smoke.json").read_text())
    names = {r["figure"] for r in rows}
    assert "error" not in names, rows
    assert {"embed_images_per_s", "search_block_cpu_s", "generate_block_images_per_s", "train_images_per_s",
            "personalize_4_side_by_side_s"} <= names, names
    assert {f"personalize_{m}_s" for m in ("textual_inversion", "cond_vectors", "textual_inversion_dm", "cond_vectors_dm")} <= names
    assert all(r["value"] > 0 for r in rows if r["figure"] != "device"), rows
    assert "| figure | value | unit | details |" in res.stdout


def test_a_failing_check_makes_the_script_exit_non_zero(tmp_path: Path) -> None:
    # a search over a pool part whose metadata lost its rows fails inside the check: the script reports it and exits 1
    res = _run(tmp_path / "out", "--only", "search", "train", env={"AUGBENCH_SMOKE_BREAK": "search"})
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads((tmp_path / "out/gpu_smoke.json").read_text())
    assert [r["check"] for r in rows if r["figure"] == "error"] == ["search"]
    assert any(r["figure"] == "train_images_per_s" for r in rows), "the other checks still ran"
