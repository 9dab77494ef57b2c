"""CLIP runs at embed.precision on a GPU (fp16, as clip-retrieval runs ViT-L/14) and in fp32 on a CPU; the stored
dtype follows the setting either way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import augbench.embed as embed
from augbench.specs import EmbedSpec


def _split(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.jpg")
    pd.DataFrame({"path": ["a.jpg"], "label": [0], "class": ["x"]}).to_parquet(tmp_path / "split.parquet")
    return tmp_path / "split.parquet"


def test_the_embed_job_hands_its_precision_to_the_model_and_a_cpu_keeps_fp32(tmp_path: Path, tiny_clip: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    made = []

    class Recording(embed.Clip):
        def __init__(self, source, device=None, precision="fp32") -> None:
            super().__init__(source, torch.device("cpu"), precision)
            made.append(self)

    monkeypatch.setattr(embed, "Clip", Recording)
    embed.embed_split(_split(tmp_path), tmp_path, tiny_clip, tmp_path / "e.npy", tmp_path / "m.parquet", EmbedSpec(precision="fp16"))
    assert np.load(tmp_path / "e.npy").dtype == np.float16
    assert made[0].dtype == torch.float32, "fp16 asked, but a CPU computes in fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the fp16 model is a GPU path")
def test_on_a_gpu_the_model_runs_in_fp16_and_agrees_with_fp32(tmp_path: Path, tiny_clip: Path) -> None:
    images = [Image.new("RGB", (40, 30), (i * 40, 90, 200 - i * 30)) for i in range(5)]
    half = embed.Clip(tiny_clip, torch.device("cuda"), "fp16")
    full = embed.Clip(tiny_clip, torch.device("cuda"), "fp32")
    assert half.dtype == torch.float16 and full.dtype == torch.float32
    assert (half.images(images) * full.images(images)).sum(1).min() > 0.999
