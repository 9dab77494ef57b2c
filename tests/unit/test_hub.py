"""What a hub snapshot skips, and that what is left loads: real repositories' file lists, and tiny folders of the real
classes in the layouts users download, filtered the way `snapshot_download` filters (huggingface_hub's own matcher)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import bin_form, build_tiny_clip, sd_layout, subprocess_env
from huggingface_hub.utils import filter_repo_objects

from augbench.hub import IGNORE, ignore_patterns

# the file lists of three repositories as the hub shows them (weights and the files next to them)
CLIP_L14 = ["config.json", "flax_model.msgpack", "merges.txt", "model.safetensors", "preprocessor_config.json",
            "pytorch_model.bin", "special_tokens_map.json", "tf_model.h5", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
SD_V15 = ["model_index.json", "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
          "safety_checker/model.fp16.safetensors", "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
          "safety_checker/pytorch_model.fp16.bin", "scheduler/scheduler_config.json", "text_encoder/config.json",
          "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
          "text_encoder/pytorch_model.fp16.bin", "tokenizer/merges.txt", "tokenizer/vocab.json", "unet/config.json",
          "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
          "unet/diffusion_pytorch_model.non_ema.bin", "unet/diffusion_pytorch_model.non_ema.safetensors",
          "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.bin",
          "vae/diffusion_pytorch_model.fp16.bin", "vae/diffusion_pytorch_model.fp16.safetensors",
          "vae/diffusion_pytorch_model.safetensors", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt"]
BIN_ONLY_SHARDED = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                    "pytorch_model.bin.index.json", "tokenizer.json"]


def kept(files: list[str]) -> list[str]:
    return sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns(files)))


def test_bin_twins_non_ema_safety_checker_and_root_checkpoints_are_skipped() -> None:
    assert kept(CLIP_L14) == ["config.json", "merges.txt", "model.safetensors", "preprocessor_config.json",
                              "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    left = kept(SD_V15)
    assert not [f for f in left if f.endswith(".bin") or ".non_ema." in f or f.startswith("safety_checker/model")]
    assert "unet/diffusion_pytorch_model.safetensors" in left and "unet/diffusion_pytorch_model.fp16.safetensors" in left
    assert "v1-5-pruned-emaonly.safetensors" not in left and "safety_checker/config.json" in left
    assert kept(BIN_ONLY_SHARDED) == sorted(BIN_ONLY_SHARDED), "a .bin-only repository keeps its weights and index"
    assert set(IGNORE) <= set(ignore_patterns(["x.bin"]))


def _snapshot(src: Path, out: Path) -> Path:
    """Copy a folder as snapshot_download would fetch it: every file the ignore patterns let through."""
    files = [str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()]
    for f in filter_repo_objects(files, ignore_patterns=ignore_patterns(files)):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, out / f)
    return out


@pytest.mark.parametrize("layout", ["current", "v1-4"])
def test_a_filtered_snapshot_of_either_sd_layout_loads_and_samples(tmp_path: Path, tiny_sd: Path, layout: str) -> None:
    from augbench.personalize import load_pipeline

    src = sd_layout(tiny_sd, tmp_path / "repo", layout)
    if layout == "current":  # a fp32 .bin twin beside the safetensors, as SD v1-5's repository has
        pipe = load_pipeline(src)
        pipe.unet.save_pretrained(src / "unet", safe_serialization=False)
        (src / "unet/diffusion_pytorch_model.non_ema.safetensors").write_bytes(b"not needed")
    snap = _snapshot(src, tmp_path / "snap")
    assert not list(snap.rglob("*.non_ema.*")) and not (layout == "current" and list(snap.rglob("*.bin")))
    assert layout == "current" or list(snap.rglob("unet/*.bin")), "a .bin-only layout keeps its weights"
    pipe = load_pipeline(snap)
    image = pipe("a photo of a circle.", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3)
    if layout == "current":
        half = load_pipeline(snap, dtype=torch.float16)
        assert half.unet.dtype == torch.float16


def test_a_filtered_snapshot_of_a_clip_with_both_weight_forms_loads(tmp_path: Path) -> None:
    from augbench.embed import Clip

    src = build_tiny_clip(tmp_path / "repo")
    shutil.copy2(src / "model.safetensors", tmp_path / "model.safetensors")
    bin_form(src / "model.safetensors")
    only_bin = Clip(src).texts(["a photo of a dog."])  # a .bin-only CLIP loads
    shutil.copy2(tmp_path / "model.safetensors", src / "model.safetensors")  # both forms, as openai/clip-vit-large-patch14
    snap = _snapshot(src, tmp_path / "snap")
    assert not (snap / "pytorch_model.bin").exists() and (snap / "model.safetensors").exists()
    assert Clip(snap).texts(["a photo of a dog."]) == pytest.approx(only_bin, abs=1e-6)


class _GatedHub(BaseHTTPRequestHandler):
    """The hub's answers for a gated repository: its model info and file list are public (gated: manual); every file is refused with
    403 and `X-Error-Code: GatedRepo`, as huggingface.co answers an account that has not accepted the licence."""

    requests: ClassVar[list[str]] = []

    def _answer(self, body: bool) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        if self.path.startswith("/api/models/org/gated-model/tree/"):  # the file list is public too
            data = json.dumps([{"type": "file", "path": "model_index.json", "size": 2, "oid": "b" * 40}]).encode()
            self.send_response(200)
        elif self.path.startswith("/api/models/org/gated-model"):
            data = json.dumps({"id": "org/gated-model", "sha": "a" * 40, "gated": "manual", "private": False,
                               "siblings": [{"rfilename": "model_index.json"}]}).encode()
            self.send_response(200)
        else:
            data = b'{"error": "Access to model org/gated-model is restricted."}'
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("token", [None, "hf_not_accepted"])
def test_a_gated_model_is_one_clear_error_naming_the_repository(tmp_path: Path, token: str | None) -> None:
    """huggingface_hub against a hub served on 127.0.0.1 (HF_ENDPOINT): without a token the fetch stops before asking
    for any file; with a token whose account has not accepted the licence the hub's GatedRepo refusal becomes the
    same error. Nothing is left in the cache."""
    _GatedHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {k: v for k, v in subprocess_env().items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HOME=str(tmp_path / "hf"),
                   HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1", **({"HF_TOKEN": token} if token else {}))
        out = tmp_path / "cache/org--gated-model/main"
        code = f"from pathlib import Path; from augbench.hub import fetch_model; fetch_model('org/gated-model', None, Path({str(out)!r}))"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("PermissionError: org/gated-model is gated on the Hugging Face hub: "
                                                    "accept its licence at https://huggingface.co/org/gated-model"), proc.stderr[-2000:]
    assert ("no hub token is set" in last) == (token is None) and ("has not accepted it" in last) == (token is not None)
    asked_files = [r for r in _GatedHub.requests if "/api/models/" not in r]
    assert (not asked_files) == (token is None), _GatedHub.requests
    assert not out.exists() and not list(out.parent.glob(".*"))
