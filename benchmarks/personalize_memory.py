"""Memory of one personalisation process per method kind, on a pipeline of Stable Diffusion 1.5's real shapes.

Builds a randomly initialised pipeline with the libraries' own classes at SD 1.5's sizes (UNet2DConditionModel 860 M,
CLIPTextModel 123 M, AutoencoderKL 84 M parameters; a 49,408-word tokenizer built in memory), holds it as augbench's
`TrainingSource` does (loaded pipeline fp32 in host memory, frozen modules once in the compute dtype, trainable tensors
fp32) and runs one training step of each method kind (each kind in a process of its own) at two small sides.

Activations are read from autograd itself: the bytes of every tensor saved for the backward pass (once per storage,
parameters left out), which is what a GPU step keeps too. They grow with the latent pixels plus a fixed part, so two
sides give a + b x pixels, extrapolated to 512 px (a step at 512 px takes tens of minutes on 2 CPU cores). The figures
set `augbench.personalize.ACTIVATION_MB_512`; the printed estimate (`memory_estimate`: frozen modules in the compute
dtype, trainable tensors with gradient and AdamW moments, activations, CUDA context) is what a GPU process of that kind
holds, and `per_gpu` how many fit one 80 / 40 / 24 GB card. On a GPU the measured peak is printed beside it.

    PYTHONPATH=src python benchmarks/personalize_memory.py                        # bf16 on the CPU, sides 64 and 128
    PYTHONPATH=src python benchmarks/personalize_memory.py --device cuda --sides 256,512

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from augbench.personalize import (  # noqa: E402
    TrainingSource,
    encode_latents,
    memory_estimate,
    param_counts,
    per_gpu,
    train_personalization,
)
from augbench.specs import PersonalizeSpec  # noqa: E402

KINDS = {"pseudo_word": ("textual_inversion", "lora"), "cond_vectors": ("cond_vectors", "lora"),
         "lora": ("cond_vectors_dm", "lora")}


def sd15_shaped():  # -> StableDiffusionPipeline
    """A randomly initialised pipeline with Stable Diffusion 1.5's module shapes (configs as in its model_index)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    words = ["<|startoftext|>", "<|endoftext|>"] + [f"w{i}" for i in range(49406)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class SavedBytes:
    """The bytes autograd keeps for the backward pass (activations): every tensor saved during a step, counted once per
    storage, parameters left out. Device-agnostic, so a CPU run measures what a GPU step would keep."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.skip and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def hooks(self):  # -> context manager
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def one(kind: str, device: str, dtype: torch.dtype, sides: list[int], checkpointing: bool = False) -> dict:
    method, finetune = KINDS[kind]
    source = TrainingSource("sd15-shaped", torch.device(device), dtype)
    source._host = sd15_shaped()  # in memory: no 3.4 GB folder written for a benchmark
    source.loads = 1
    rows = []
    for side in sides:
        spec = PersonalizeSpec(method=method, steps=1, batch_size=1, dm_finetune=finetune, resolution=side)
        pipe = source.pipeline(method, finetune)
        images = np.random.default_rng(0).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
        latents = encode_latents(pipe, images, micro_batch=1)
        assign = np.arange(2) if kind == "cond_vectors" else np.zeros(2, dtype=np.int64)
        params = [p for n in ("unet", "text_encoder", "vae") for p in getattr(pipe, n).parameters()]
        saved = SavedBytes(params)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.time()
        with saved.hooks():
            learned = train_personalization(pipe, latents, assign, "k", "w5", spec, gradient_checkpointing=checkpointing)
        row = {"side": side, "s_per_step": round(time.time() - started, 1), "saved_mb": saved.bytes / 2**20,
               "loss": learned.final_loss}
        if device == "cuda":
            row["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        source.release(pipe)
        rows.append(row)
    # activations grow with the latent pixels plus a part that does not (text encoder, time embedding): a + b * pixels
    (s0, a0), (s1, a1) = [(r["side"] ** 2, r["saved_mb"]) for r in rows[-2:]]
    b = (a1 - a0) / (s1 - s0)
    at_512 = a1 + b * (512**2 - s1)
    spec = PersonalizeSpec(method=method, steps=1, batch_size=1, dm_finetune=finetune, resolution=512)
    estimate = memory_estimate(param_counts(source.host()), method, spec, compute_bytes=2 if dtype != torch.float32 else 4,
                               vectors=2 if kind == "cond_vectors" else 1)
    return {"kind": kind, "method": method, "rows": rows, "activations_512_mb": round(at_512), "estimate": estimate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--sides", default="64,128", help="latent-scale check: activations measured at these sides")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--gradient-checkpointing", action="store_true", help="the denoiser recomputes its activations")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    sides = [int(x) for x in a.sides.split(",")]
    if a.one:
        print(json.dumps(one(a.one, a.device, dtype, sides, a.gradient_checkpointing)))
        return
    print(f"personalisation, one process per kind: SD 1.5 shapes, batch 1, {a.dtype} on {a.device}; activations measured"
          f" at {a.sides} px and extrapolated to 512 px (a + b x pixels); estimate at 512 px"
          f"{'; gradient checkpointing' if a.gradient_checkpointing else ''}")
    print(f"{'kind':<13} {'saved MB per side':>22} {'s/step':>12} {'activ.@512':>11} {'est. frozen':>12} "
          f"{'est. train':>11} {'est. total':>11} {'per 80/40/24 GB':>16}")
    for kind in a.kinds.split(","):
        cmd = [sys.executable, __file__, "--one", kind, "--device", a.device, "--dtype", a.dtype, "--sides", a.sides,
               *(["--gradient-checkpointing"] if a.gradient_checkpointing else [])]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            print(f"{kind:<13} failed: {res.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        e = r["estimate"]
        fits = "/".join(str(per_gpu(g * 1024, e["total_mb"])) for g in (80, 40, 24))
        saved = "/".join(f"{x['saved_mb']:.0f}" for x in r["rows"])
        steps = "/".join(f"{x['s_per_step']:.0f}" for x in r["rows"])
        print(f"{kind:<13} {saved:>22} {steps:>12} {r['activations_512_mb']:>11} {e['frozen_mb']:>12} "
              f"{e['trainable_mb']:>11} {e['total_mb']:>11} {fits:>16}")
        for x in r["rows"]:
            if "peak_allocated_mb" in x:
                print(f"{'':<13} measured peak allocated at {x['side']} px: {x['peak_allocated_mb']} MB")


if __name__ == "__main__":
    main()
