"""Atomic writes leave nothing behind on failure; device selection does not trust CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from augbench.device import pick_device
from augbench.io import atomic_path


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "out.npy"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done" and list(tmp_path.iterdir()) == [target]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without a usable GPU")
def test_visible_devices_without_gpu_falls_back_with_a_log_line(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with caplog.at_level(logging.WARNING, logger="augbench.device"):
        assert pick_device().type == "cpu"
    assert "CUDA_VISIBLE_DEVICES=0" in caplog.text
