"""GPU smoke run and throughput figures: augbench's own generate / personalize / train on a CUDA GPU.

Not a test (CI has no GPU): run by hand on a GPU machine, it prints one line per figure.

- generation: `augbench.generate.generate` on a pipeline with Stable Diffusion v1's architecture
  (random weights, built here: no hub), fp16 + SDPA, 512 px, DPM-Solver 25 steps; images/s against
  the plain `StableDiffusionPipeline.__call__` on the same pipeline and batch (the ratio is our overhead).
- personalisation: `train_personalization` steps/s for textual_inversion_dm (LoRA) at 512 px.
- classifier: `augbench.classify.train`, ResNet-50 at 224 px, bfloat16 autocast + channels_last,
  images/s against a plain torchvision loop (same model, batch, optimiser) in the same run.

Usage: PYTHONPATH=src python scripts/gpu_smoke.py OUT_DIR [generate|personalize|train ...]  (default: all three)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image


def sd_v1_pipeline(out: Path) -> Path:
    """A StableDiffusionPipeline folder with SD v1's UNet, VAE and CLIP ViT-L/14 text encoder shapes, random weights."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from augbench.toy.clip_train import train_tokenizer
    from augbench.toy.diffusion import noise_scheduler

    words = ["circle", "square", "photo", "dog", "cat", "tench", "goldfish", "church", "parachute", "truck"]
    tok = train_tokenizer([f"a photo of a {w}." for w in words] * 50, 400)
    tok.model_max_length = 77
    with torch.device("cuda"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    vae.register_to_config(scaling_factor=0.18215)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=noise_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(out)
    return out


def figure(name: str, value: float, unit: str, **extra: object) -> dict[str, object]:
    row = {"figure": name, "value": round(value, 3), "unit": unit, **extra}
    print(json.dumps(row), flush=True)
    return row


def bench_generation(model: Path, work: Path) -> list[dict[str, object]]:
    from augbench.generate import generate, set_scheduler
    from augbench.personalize import load_pipeline
    from augbench.specs import GenerateSpec

    rows = []
    n, bs, steps = 32, 8, 25
    spec = GenerateSpec(method="prompt_classname", n_images=n, batch_size=bs, steps=steps, guidance_scale=7.5, resolution=512)
    generate(model, "dog", "dog", 0, work / "warm.tar", work / "warm.parquet", work / "warm_cache",
             GenerateSpec(**{**spec.__dict__, "n_images": bs}))
    torch.cuda.synchronize()
    t = time.perf_counter()
    generate(model, "dog", "dog", 0, work / "a.tar", work / "a.parquet", work / "cache_a", spec)
    ours = n / (time.perf_counter() - t)
    rows.append(figure("generate_images_per_s", ours, "img/s", resolution=512, steps=steps, batch=bs, dtype="fp16",
                       note="includes pipeline load and PNG encoding"))
    pipe = load_pipeline(model, torch.device("cuda"), torch.float16)
    set_scheduler(pipe, "dpm")
    pipe.set_progress_bar_config(disable=True)
    pipe(["a photo of a dog."] * bs, num_inference_steps=steps, guidance_scale=7.5, height=512, width=512)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n // bs):
        pipe(["a photo of a dog."] * bs, num_inference_steps=steps, guidance_scale=7.5, height=512, width=512)
    torch.cuda.synchronize()
    plain = n / (time.perf_counter() - t)
    rows.append(figure("plain_pipeline_images_per_s", plain, "img/s", ratio_ours_to_plain=round(ours / plain, 3)))
    return rows


def bench_personalize(model: Path) -> list[dict[str, object]]:
    from augbench.personalize import encode_latents, load_pipeline, train_personalization
    from augbench.specs import PersonalizeSpec

    pipe = load_pipeline(model, torch.device("cuda"))
    images = np.random.default_rng(0).integers(0, 256, (8, 512, 512, 3), dtype=np.uint8)
    latents = encode_latents(pipe, images)
    rows = []
    for method in ("textual_inversion", "textual_inversion_dm"):
        steps = 30
        spec = PersonalizeSpec(method=method, steps=steps, batch_size=4)
        torch.cuda.synchronize()
        t = time.perf_counter()
        learned = train_personalization(pipe, latents, np.zeros(8, dtype=np.int64), "dog", "dog", spec)
        torch.cuda.synchronize()
        rows.append(figure(f"personalize_{method}_steps_per_s", steps / (time.perf_counter() - t), "step/s", batch=4,
                           resolution=512, final_loss=round(float(learned.final_loss), 4)))
        pipe = load_pipeline(model, torch.device("cuda"))  # a fresh UNet / tokenizer for the next method
    return rows


def bench_train(work: Path) -> list[dict[str, object]]:
    import torchvision

    from augbench.classify import train
    from augbench.specs import TrainSpec

    root = work / "imgs"
    rng = np.random.default_rng(0)
    rows = []
    for split, per in (("train", 128), ("test", 16)):
        for c in range(10):
            for i in range(per):
                p = Path(split) / f"c{c}" / f"{i:04d}.jpg"
                (root / p).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(root / p, quality=90)
                rows.append({"split": split, "path": str(p), "label": c, "class": f"c{c}"})
    df = pd.DataFrame(rows)
    for split in ("train", "test"):
        df[df.split == split].drop(columns="split").to_parquet(work / f"{split}.parquet")
    bs, epochs = 128, 8
    spec = TrainSpec(arch="resnet50", input_size=224, load_size=256, epochs=epochs, batch_size=bs, min_steps=0, checkpoint_every=10**6)
    t = time.perf_counter()
    out = train([work / "train.parquet"], root, work / "test.parquet", [], 0, 0, 10, work / "m.json", work / "m.pt", spec)
    total = time.perf_counter() - t
    result = [figure("train_resnet50_wall_s", total, "s", steps=int(out["steps"]), batch=bs, images=1280,
                     note="includes decode, eval, save")]
    # plain loop: same model, batch, optimiser, bf16 autocast + channels_last, random tensors already on the GPU
    model = torchvision.models.resnet50(num_classes=10).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(bs, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,), device="cuda")
    for i in range(25):
        if i == 5:
            torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    plain = 20 * bs / (time.perf_counter() - t)
    result.append(figure("plain_resnet50_train_images_per_s", plain, "img/s", batch=bs, note="compute only, no data pipeline"))
    return result


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    parts = sys.argv[2:] or ["generate", "personalize", "train"]
    rows = [figure("gpu", 0, "", device=torch.cuda.get_device_name(), torch=torch.__version__)]
    model = work / "sd_v1_random"
    if {"generate", "personalize"} & set(parts):
        t = time.perf_counter()
        sd_v1_pipeline(model)
        rows.append(figure("build_sd_v1_random_s", time.perf_counter() - t, "s"))
    benches = {"generate": lambda: bench_generation(model, work), "personalize": lambda: bench_personalize(model),
               "train": lambda: bench_train(work)}
    for bench in (benches[p] for p in parts):
        try:
            rows += bench()
        except Exception as exc:  # one failing part must not hide the others' figures
            rows.append(figure("error", 0, "", error=f"{type(exc).__name__}: {exc}"))
            import traceback

            traceback.print_exc()
    (out / "gpu_smoke.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
