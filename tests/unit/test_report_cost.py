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
