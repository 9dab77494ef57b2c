"""Shared fixtures: environment for offline runs, and a recording HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # the tests' helper modules (photos, oddities) from any test folder


def subprocess_env() -> dict[str, str]:
    """The environment for workflow subprocesses: this venv's bin first, so rules find `python -m augbench`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def scheduled_jobs(dry_run_output: str) -> dict[str, int]:
    """The job-count table of a snakemake dry run: {rule: count} ({} when there is none)."""
    table = re.search(r"Job stats:\njob\s+count\n[-\s]+\n(.*?)\ntotal", dry_run_output, re.S)
    if table is None:
        return {}
    return {line.split()[0]: int(line.split()[1]) for line in table.group(1).splitlines() if line.strip()}


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and records every requested path (to check what a rerun asks for)."""

    requests: list[str]

    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def recording_server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """(base url, served folder, list of requested paths) for a server started on 127.0.0.1."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RecordingHandler, directory=str(root)))
    server.requests = []  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, server.requests  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def build_tiny_sd(out: Path, classes: tuple[str, ...] = ("circle", "square", "triangle")) -> Path:
    """Build and save a tiny, untrained `StableDiffusionPipeline` folder, as if it were Stable Diffusion.

    Tokenizer: an offline CLIP BPE tokenizer trained on a few captions; text encoder: a 2-layer
    `CLIPTextModel`; VAE and UNet: augbench's tiny toy-world architectures at 16x16 pixels.
    """
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from augbench.specs import DiffusionSpec
    from augbench.toy.clip_train import train_tokenizer
    from augbench.toy.diffusion import build_unet, build_vae, noise_scheduler

    torch.manual_seed(0)
    captions = [f"a photo of a {c}." for c in classes] * 20 + ["a drawing of the plus sign on a wall", "itap of my ring"] * 10
    tokenizer = train_tokenizer(captions, 300)
    tokenizer.model_max_length = 12
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=12, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    spec = DiffusionSpec(image_size=16, vae_widths=(8, 16), unet_widths=(16, 32), unet_attention=(True, True), norm_groups=4,
                         attention_head_dim=2)
    pipe = StableDiffusionPipeline(vae=build_vae(spec), text_encoder=text, tokenizer=tokenizer, unet=build_unet(spec, 32),
                                   scheduler=noise_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def build_tiny_clip(out: Path, words: tuple[str, ...] = ("circle", "square", "triangle", "dog", "cat")) -> Path:
    """Build and save a tiny, randomly initialised `transformers.CLIPModel` with a ViT vision tower (the class
    openai/clip-vit-large-patch14 uses), its `CLIPImageProcessor` (shorter side resized, centre crop) and a CLIP BPE
    tokenizer trained in memory: a real-architecture CLIP folder as `from_pretrained` reads it, nothing from the toy model."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from augbench.toy.clip_train import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer([f"a photo of a {w}." for w in words] * 20 + ["itap of my ring", "a drawing of it"] * 10, 300)
    tokenizer.model_max_length = 16
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32,
              "patch_size": 8}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny real-architecture CLIP folder (built once per test session)."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


def sd_layout(src: Path, out: Path, layout: str) -> Path:
    """The tiny SD folder `src` rewritten in a layout users download:

    - "current" (runwayml/stable-diffusion-v1-5 today): safetensors weights with an `fp16` variant beside the fp32 ones,
      the pipeline's own `save_pretrained(variant="fp16")`;
    - "v1-4" (CompVis/stable-diffusion-v1-4's older layout): `.bin` weights, and `safety_checker` / `feature_extractor`
      entries in `model_index.json` with their folders (a tiny `StableDiffusionSafetyChecker`, a `CLIPImageProcessor`).
    """
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = StableDiffusionPipeline.from_pretrained(str(src), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    if layout == "current":
        pipe.save_pretrained(out)
        pipe.to(torch.float16).save_pretrained(out, variant="fp16")
        return out
    if layout != "v1-4":
        raise ValueError(layout)
    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
              "patch_size": 8}
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                                   "num_attention_heads": 2}, vision_config=vision, projection_dim=16))
    old = StableDiffusionPipeline(**{**pipe.components, "safety_checker": checker,
                                     "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32},
                                                                             crop_size={"height": 32, "width": 32})},
                                  requires_safety_checker=True)
    old.save_pretrained(out, safe_serialization=False)
    for f in out.rglob("model.safetensors"):  # transformers 5 writes safetensors whatever it is asked: the old name
        bin_form(f)
    return out


def bin_form(weights: Path) -> Path:
    """A transformers `model.safetensors` rewritten as the `pytorch_model.bin` older releases wrote (torch.save of the
    state dict), the safetensors file removed: the layout of repositories saved before safetensors."""
    import torch
    from safetensors.torch import load_file

    out = weights.with_name("pytorch_model.bin")
    torch.save(load_file(weights), out)
    weights.unlink()
    return out


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Stable Diffusion pipeline folder (built once per test session)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "pipeline")


@pytest.fixture
def target(tmp_path: Path) -> tuple[Path, Path]:
    """A training table with four images of class 0 ("circle") and two of class 1."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i, (label, name) in enumerate([(0, "circle")] * 4 + [(1, "square")] * 2):
        path = Path("train") / name / f"{i:03d}.png"
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / path)
        rows.append({"path": str(path), "label": label, "class": name})
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    return tmp_path / "train.parquet", tmp_path
