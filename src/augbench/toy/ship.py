"""Ship the toy foundation models: fp16 `from_pretrained` folders under `models/toy/` with a manifest.

In the real world nobody pretrains CLIP or Stable Diffusion per experiment: they are loaded from a
folder. The toy world does the same: `make toy-models` trains the toy CLIP and the toy latent
diffusion model once (config/toy_models.yaml) and this module copies them with their weights in
fp16 (transformers and diffusers load them back as fp32 on the CPU), measures their quality on the
world they were trained on, and writes `manifest.json`: the world spec, the code's stage versions
and commit, the training specs, the sha256 of every file, the command that rebuilds them, its
measured time and the measured quality.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from augbench.io import atomic_dir, write_json
from augbench.specs import STAGE_VERSIONS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def copy_fp16(src: Path, dst: Path) -> None:
    """Copy a model folder, rewriting every safetensors file with its floating-point tensors in fp16."""
    from safetensors.torch import load_file, save_file

    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_dir() or rel.name.endswith(".meta.json") or any(p.startswith(".") for p in rel.parts):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(dst / rel),
                      metadata={"format": "pt"})
        else:
            shutil.copy2(f, dst / rel)


def _meta(folder: Path) -> dict:
    path = folder.with_name(folder.name + ".meta.json")
    return json.loads(path.read_text()) if path.exists() else {}


def measure(clip: Path, diffusion: Path, world: Path, n_pool: int = 2000) -> dict[str, object]:
    """The shipped models' quality on their world: the CLIP's zero-shot top-1 on the test split and on target-kind
    pool images, and on those images' VAE reconstructions (what caps generation fidelity)."""
    import pandas as pd
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from augbench.embed import Clip
    from augbench.imaging import decode

    info = json.loads((world / "classes.json").read_text())
    names = [info["names"][k] for k in info["classes"]]
    model = Clip(clip, device=torch.device("cpu"))
    test = pd.read_parquet(world / "target/test.parquet")
    pred = model.zero_shot([Image.open(world / p).convert("RGB") for p in test["path"]], names)
    pool = pd.read_parquet(world / "pool/pool.parquet")
    pool = pool[pool["true_label"] >= 0].head(n_pool)  # -1 marks distractor kinds
    raw = np.stack([decode(str(world / f), 32) for f in pool["file"]])
    vae = AutoencoderKL.from_pretrained(diffusion / "vae").eval()
    with torch.no_grad():
        x = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = torch.cat([vae.decode(vae.encode(x[i:i + 256]).latent_dist.mean).sample for i in range(0, len(x), 256)])
        rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        psnr = float(10 * torch.log10(4 / torch.mean((rec.clamp(-1, 1) - x) ** 2)))
    truth = pool["true_label"].to_numpy()
    on_raw = model.zero_shot([Image.fromarray(a) for a in raw], names)
    on_rec = model.zero_shot([Image.fromarray(a) for a in rec_u8], names)
    return {"clip_zero_shot_test_top1": float((pred == test["label"].to_numpy()).mean()),
            "clip_on_pool_images": float((on_raw == truth).mean()),
            "clip_on_vae_reconstructions": float((on_rec == truth).mean()), "vae_psnr_db": psnr,
            "fidelity_learning_curve": _meta(diffusion).get("stats", {}).get("learning_curve", [])}


def ship(clip: Path, diffusion: Path, world: Path, out: Path, command: str) -> dict[str, object]:
    """Write `out/clip`, `out/diffusion` (fp16) and `out/manifest.json`; returns the manifest."""
    started = time.time()
    with atomic_dir(out) as tmp:
        copy_fp16(clip, tmp / "clip")
        copy_fp16(diffusion, tmp / "diffusion")
        quality = measure(tmp / "clip", tmp / "diffusion", world)
        quality["fidelity_learning_curve"] = _meta(diffusion).get("stats", {}).get("learning_curve", [])  # the source's sidecar
        files = {str(f.relative_to(tmp)): sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
        clip_meta, sd_meta = _meta(clip), _meta(diffusion)
        manifest = {
            "world": json.loads((world / "classes.json.meta.json").read_text())["spec"],
            "code": {"commit": commit, "stage_versions": {k: STAGE_VERSIONS[k] for k in ("world", "pretrain_clip", "pretrain_diffusion")}},
            "training": {"clip": clip_meta.get("spec"), "diffusion": sd_meta.get("spec")},
            "command": command,
            "seconds": {"clip": clip_meta.get("elapsed_s"), "diffusion": sd_meta.get("elapsed_s"),
                        "host": sd_meta.get("host"), "shipping": round(time.time() - started, 1)},
            "quality": quality,
            "files": files,
            "size_mb": round(sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 1e6, 2),
        }
        write_json(tmp / MANIFEST, manifest)
    log.info("ship: %s (%.1f MB): %s", out, manifest["size_mb"], {k: v for k, v in quality.items() if k != "fidelity_learning_curve"})
    return manifest


def world_differences(model_folder: str | Path, world_spec: dict[str, object]) -> list[str]:
    """Keys where a shipped model's training world differs from `world_spec` (empty: same world, or no manifest)."""
    manifest = Path(model_folder).parent / MANIFEST
    if not manifest.exists():
        return []
    trained = json.loads(manifest.read_text())["world"]
    return [f"{k}: trained on {trained.get(k)!r}, this world {world_spec.get(k)!r}"
            for k in sorted(set(trained) | set(world_spec)) if k != "version" and trained.get(k) != world_spec.get(k)]
