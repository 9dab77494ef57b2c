"""Shipping the toy foundation models: fp16 folders that load back with from_pretrained, and a manifest that holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from augbench.specs import ClipSpec, WorldSpec
from augbench.toy.clip_train import save_clip, train_clip
from augbench.toy.ship import MANIFEST, sha256, ship, world_differences
from augbench.toy.world import build_world


def test_shipped_models_are_fp16_load_as_fp32_and_the_manifest_matches_the_files(tmp_path: Path, tiny_sd: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from safetensors.torch import load_file

    spec = WorldSpec(n_classes=3, n_distractors=1, shots=2, val_per_class=1, test_per_class=4, pool_size=40)
    build_world(spec, tmp_path / "world")
    import pandas as pd

    pool = pd.read_parquet(tmp_path / "world/pool/pool.parquet")
    images = np.stack([np.asarray(Image.open(tmp_path / "world" / f).convert("RGB")) for f in pool["file"]])
    model, tokenizer, _ = train_clip(images, list(pool["caption"]), ClipSpec(steps=2, batch_size=8, warmup_steps=1, vocab_size=600))
    save_clip(model, tokenizer, 32, tmp_path / "clip")

    manifest = ship(tmp_path / "clip", tiny_sd, tmp_path / "world", tmp_path / "models/toy", "make toy-models")
    out = tmp_path / "models/toy"
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    files = {str(f.relative_to(out)): sha256(f) for f in out.rglob("*") if f.is_file() and f.name != MANIFEST}
    assert on_disk["files"] == files and "clip/model.safetensors" in files and "diffusion/unet/diffusion_pytorch_model.safetensors" in files
    for f in out.rglob("*.safetensors"):
        assert {t.dtype for t in load_file(str(f)).values() if t.is_floating_point()} == {torch.float16}, f
    pipe = StableDiffusionPipeline.from_pretrained(out / "diffusion")
    assert pipe.unet.dtype == torch.float32  # fp16 on disk, fp32 on the CPU
    assert on_disk["world"]["pool_size"] == 40 and on_disk["command"] == "make toy-models"
    assert 0 <= on_disk["quality"]["clip_on_vae_reconstructions"] <= 1
    assert world_differences(out / "clip", {**on_disk["world"]}) == []
    assert world_differences(out / "clip", {**on_disk["world"], "seed": 5}) == ["seed: trained on 0, this world 5"]
