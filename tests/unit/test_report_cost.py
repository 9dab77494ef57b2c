"""Cost accounting: each job's own CPU seconds (from its closing log line) replace the benchmark's truncated sample."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from augbench.cli import main
from augbench.report import CPU_LINE, read_benchmarks

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(folder: Path, rel: str, wall: float, cpu: float) -> None:
    path = folder / f"{rel}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{wall}\t0:00:{int(wall):02d}\t900\t5000\t500\t700\t0\t37\t43\t{cpu}\n")


def test_logged_cpu_replaces_the_benchmarks_last_sample(tmp_path: Path) -> None:
    bench, logs = tmp_path / "benchmarks", tmp_path / "logs"
    _bench(bench, "train/real/0/1", 33.7, 15.1)  # a 34-s job whose last benchmark sample came at ~15 s
    _bench(bench, "train/real/0/2", 33.0, 14.9)  # no log: the benchmark value stays
    _bench(bench, "generate/prompt_classname/circle", 10.0, 9.3)  # a log without the closing line (killed job)
    (logs / "train/real/0").mkdir(parents=True)
    (logs / "train/real/0/1.log").write_text("... INFO augbench: augbench train done in 32.6s (cpu 36.2s): {'top1': 0.25}\n")
    (logs / "generate/prompt_classname").mkdir(parents=True)
    (logs / "generate/prompt_classname/circle.log").write_text("... INFO augbench.generate: chunk 1/2\n")
    rows = read_benchmarks(bench, logs).set_index("key")["cpu_s"]
    assert rows.to_dict() == {"real/0/1": 36.2, "real/0/2": 14.9, "prompt_classname/circle": 9.3}
    assert read_benchmarks(bench).set_index("key").loc["real/0/1", "cpu_s"] == 15.1  # without logs: as before


def test_every_command_logs_its_cpu_on_the_closing_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pd.DataFrame({"key": ["000"], "file": ["pool/images/0.png"], "caption": ["a circle"]}).to_parquet(tmp_path / "pool.parquet")
    with caplog.at_level(logging.INFO, logger="augbench"):
        assert main(["parts", "--pool", str(tmp_path / "pool.parquet"), "--out", str(tmp_path / "p0.parquet")]) == 0
    found = CPU_LINE.findall(caplog.text)
    assert len(found) == 1 and float(found[0]) > 0  # the interpreter's start-up and imports count too


def _job(bench: Path, logs: Path, rel: str, wall: float, start: str, end: str, alloc: str | None) -> None:
    """A job's benchmark record and its log: first line (with the Slurm allocation, as augbench.cli.main writes it) and
    closing line, at the given times."""
    _bench(bench, rel, wall, wall)
    log = logs / f"{rel}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    tag = f" [slurm job {alloc}]" if alloc else ""
    log.write_text(f"2026-12-03 {start},000 INFO augbench: augbench {rel.split('/')[0]} --out x{tag}\n"
                   f"2026-12-03 {end},000 INFO augbench: augbench {rel.split('/')[0]} done in {wall}s (cpu {wall}s): {{}}\n")


def test_a_grouped_allocation_counts_once_and_shared_jobs_are_divided(tmp_path: Path) -> None:
    from augbench.report import GPU_STAGES, method_cost, stage_costs

    bench, logs = tmp_path / "benchmarks", tmp_path / "logs"
    # one group allocation: four personalise blocks side by side on one GPU for 100 s (each job's wall is 100 s)
    for b in range(4):
        _job(bench, logs, f"personalize/textual_inversion/block_000{b}", 100, "10:00:00", "10:01:40", "777")
    # a generate block alone in its allocation; two search blocks on a GPU, serving both retrieval rows
    _job(bench, logs, "generate/textual_inversion/block_0000", 50, "11:00:00", "11:00:50", "778")
    _job(bench, logs, "search/00000", 40, "09:00:00", "09:00:40", "701")
    _job(bench, logs, "search/00001", 20, "09:00:00", "09:00:20", "702")
    _job(bench, logs, "retrieve/image", 10, "09:01:00", "09:01:10", "703")
    rows = read_benchmarks(bench, logs)
    methods = ["textual_inversion", "retrieval_image", "retrieval_text"]
    gpu_stages = GPU_STAGES | {"search", "retrieve"}

    ti = method_cost(rows, "textual_inversion", 50, True, methods, gpu_stages)
    assert abs(ti["gpu_hours"] * 3600 - (100 + 50)) < 1e-6  # the allocation's 100 s once, not 4 x 100 s; its block alone
    per_stage = stage_costs(rows, True, gpu_stages).set_index("stage")["gpu_hours"] * 3600
    assert abs(per_stage["personalize"] - 100) < 1e-6 and abs(per_stage["search"] - 60) < 1e-6
    image = method_cost(rows, "retrieval_image", 50, True, methods, gpu_stages)
    text = method_cost(rows, "retrieval_text", 50, True, methods, gpu_stages)
    assert abs(image["gpu_hours"] * 3600 - (60 / 2 + 10)) < 1e-6  # half the search blocks, its own merge
    assert abs(text["gpu_hours"] * 3600 - 60 / 2) < 1e-6
    # without the allocation on the log lines (a local run), each job's wall time is its own GPU time
    for b in range(4):
        _job(bench, logs, f"personalize/textual_inversion/block_000{b}", 100, "10:00:00", "10:01:40", None)
    alone = method_cost(read_benchmarks(bench, logs), "textual_inversion", 50, True, methods, gpu_stages)
    assert abs(alone["gpu_hours"] * 3600 - (400 + 50)) < 1e-6


def test_the_allocation_is_on_every_commands_first_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from augbench.report import ALLOCATION

    pd.DataFrame({"key": ["000"], "file": ["pool/images/0.png"], "caption": ["a circle"]}).to_parquet(tmp_path / "pool.parquet")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with caplog.at_level(logging.INFO, logger="augbench"):
        assert main(["parts", "--pool", str(tmp_path / "pool.parquet"), "--out", str(tmp_path / "p0.parquet")]) == 0
    first = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("augbench parts"))
    assert ALLOCATION.search(first).group(1) == "4242"


def test_a_generators_guidance_rows_share_its_personalisation(tmp_path: Path) -> None:
    """`cond_vectors_dm@sd-g2` and `cond_vectors_dm@sd-g7.5` read one personalisation, `cond_vectors_dm@sd`: each row
    pays half of it beside its own generation; a row of another generator pays nothing of it."""
    from augbench.report import method_cost, personalisation_row

    bench, logs = tmp_path / "benchmarks", tmp_path / "logs"
    _job(bench, logs, "personalize/cond_vectors_dm@sd/block_0000", 100, "10:00:00", "10:01:40", None)
    _job(bench, logs, "personalize/cond_vectors_dm@flux/block_0000", 300, "10:00:00", "10:05:00", None)
    _job(bench, logs, "generate/cond_vectors_dm@sd-g2/block_0000", 10, "11:00:00", "11:00:10", None)
    _job(bench, logs, "generate/cond_vectors_dm@sd-g7.5/block_0000", 20, "11:00:00", "11:00:20", None)
    _job(bench, logs, "generate/cond_vectors_dm@flux/block_0000", 30, "11:00:00", "11:00:30", None)
    rows = read_benchmarks(bench, logs)
    methods = ["real", "cond_vectors_dm@sd-g2", "cond_vectors_dm@sd-g7.5", "cond_vectors_dm@flux"]
    assert personalisation_row("cond_vectors_dm@sd-g7.5") == "cond_vectors_dm@sd"
    assert personalisation_row("cond_vectors_dm@flux") == "cond_vectors_dm@flux" == personalisation_row("cond_vectors_dm@flux")
    cost = {m: method_cost(rows, m, 50, True, methods)["gpu_hours"] * 3600 for m in methods[1:]}
    assert abs(cost["cond_vectors_dm@sd-g2"] - (100 / 2 + 10)) < 1e-6, cost
    assert abs(cost["cond_vectors_dm@sd-g7.5"] - (100 / 2 + 20)) < 1e-6, cost
    assert abs(cost["cond_vectors_dm@flux"] - (300 + 30)) < 1e-6, cost
