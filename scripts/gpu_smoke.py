"""One GPU check of every CUDA branch of the library, with figures, that cannot rot: `tests/integration/test_gpu_smoke.py`
runs the same code with tiny models on the CPU, so a changed signature fails `make test`.

Checks (each prints a JSON row; a check that fails prints an `error` row, and the script exits non-zero at the end):

- `embed`: the embed job's `embed_split` (CLIP at `embed.precision`: fp16 on a GPU) against a bare loop of
  `CLIPModel.get_image_features` over the same images: images/s and their ratio.
- `search`: one search block on the GPU (`device cuda`: fp16 matrix products and topk) and on the CPU (faiss.knn) over
  the same pool part; the neighbour lists are compared (equal but for fp16 ties: counted).
- `personalize`: one class at the model's resolution for each method kind (pseudo-word, conditioning vectors, each
  with LoRA on the denoiser) through `personalize_block` (the job's function): steps/s and peak GPU memory; then four
  `python -m augbench personalize` processes side by side, as the Slurm profile groups four blocks on one GPU.
- `generate`: `generate_block` against a bare pipeline call on the same pipeline, batch and steps: images/s and ratio.
- `train`: the classifier from the decode cache (`decode_split` then `classify.train`), 200 steps of ResNet-50 at
  224 px (bf16 autocast, channels_last): images/s.

Models are the real classes with random weights (Stable Diffusion v1's and CLIP ViT-L/14's shapes; `--tiny`: tiny
ones), built here: no hub, no toy model.

    PYTHONPATH=src python scripts/gpu_smoke.py OUT                 # on a GPU machine: the figures (under 10 minutes on one H200)
    PYTHONPATH=src python scripts/gpu_smoke.py OUT --tiny --device cpu   # what the test runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

from photos import jpeg, photo  # noqa: E402

SIZES = {  # (real, tiny)
    "resolution": (512, 32), "sd_steps": (25, 2), "batch": (8, 2), "images": (32, 4), "personalize_steps": (50, 3),
    "photos_per_class": (8, 3), "photo": ((640, 480), (48, 36)), "pool_rows": (1_000_000, 4_000), "queries": (8_000, 64),
    "k": (64, 8), "train_steps": (200, 3), "train_input": (224, 32), "train_batch": (128, 8), "embed_images": (512, 8),
}


def size(name: str, tiny: bool):  # -> the value for this run
    return SIZES[name][1 if tiny else 0]


def figure(table: list[dict], name: str, value: float, unit: str, **extra: object) -> None:
    row = {"figure": name, "value": round(float(value), 4), "unit": unit, **extra}
    print(json.dumps(row), flush=True)
    table.append(row)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_sd(out: Path, tiny: bool, device: torch.device) -> Path:
    """A StableDiffusionPipeline folder with SD v1's shapes (or tiny ones), random weights, saved with save_pretrained."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from augbench.toy.clip_train import train_tokenizer  # a CLIP BPE tokenizer trained in memory (no download)

    words = ["circle", "square", "photo", "dog", "cat", "tench", "goldfish", "church", "parachute", "truck", "heron", "kayak"]
    tok = train_tokenizer([f"a photo of a {w}." for w in words] * 50, 400)
    tok.model_max_length = 77 if not tiny else 16
    torch.manual_seed(0)
    if tiny:
        unet = UNet2DConditionModel(sample_size=size("resolution", tiny) // 2, block_out_channels=(16, 32), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    else:
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vae.register_to_config(scaling_factor=0.18215)
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    if device.type == "cuda":
        pipe.to(torch.float16).save_pretrained(out, variant="fp16")
    return out


def build_clip(out: Path, tiny: bool) -> Path:
    """A transformers CLIPModel with a ViT tower (ViT-L/14's shape, or tiny), random weights, and its processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from augbench.toy.clip_train import train_tokenizer

    tok = train_tokenizer(["a photo of a thing."] * 20, 300)
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    side = 32 if tiny else 224
    vision = ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": side,
               "patch_size": 8} if tiny else
              {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": side,
               "patch_size": 14})
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24 if tiny else 768)).save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(out)
    return out


def build_photos(work: Path, tiny: bool) -> tuple[Path, Path]:
    """Two classes of non-square JPEG photos, their split table (absolute paths) and classes.json."""
    rows = []
    for label, cls in enumerate(("heron", "kayak")):
        (work / "photos" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(size("photos_per_class", tiny)):
            p = work / "photos" / cls / f"{i}.jpg"
            p.write_bytes(jpeg(photo(10 * label + i, label, size("photo", tiny))))
            rows.append({"path": str(p), "label": label, "class": cls})
    pd.DataFrame(rows).to_parquet(work / "train.parquet")
    (work / "classes.json").write_text(json.dumps({"classes": ["heron", "kayak"], "names": {"heron": "heron", "kayak": "kayak"}}))
    return work / "train.parquet", work / "classes.json"


def check_embed(rows: list[dict], work: Path, clip: Path, device: torch.device, tiny: bool) -> None:
    from augbench.embed import Clip, embed_split
    from augbench.imaging import open_rgb
    from augbench.specs import EmbedSpec

    n = size("embed_images", tiny)
    paths = [str(p) for p in sorted((work / "photos").rglob("*.jpg"))]
    paths = (paths * (n // len(paths) + 1))[:n]
    pd.DataFrame({"path": paths, "label": 0, "class": "x"}).to_parquet(work / "embed.parquet")
    os.environ["AUGBENCH_DEVICE"] = device.type
    spec = EmbedSpec(batch_size=64 if not tiny else 4, precision="fp16")
    embed_split(work / "embed.parquet", Path("/"), clip, work / "e.npy", work / "e.parquet", spec)  # warm-up
    sync(device)
    t = time.perf_counter()
    embed_split(work / "embed.parquet", Path("/"), clip, work / "e.npy", work / "e.parquet", spec)
    sync(device)
    ours = n / (time.perf_counter() - t)
    model = Clip(clip, device, "fp16")
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, spec.batch_size):
            images = [open_rgb(p) for p in paths[i:i + spec.batch_size]]
            pixel = model.processor(images=images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
            model.model.get_image_features(pixel_values=pixel)
    sync(device)
    bare = n / (time.perf_counter() - t)
    figure(rows, "embed_images_per_s", ours, "img/s", dtype=str(model.dtype), bare=round(bare, 2), ratio=round(ours / bare, 3),
           images=n, note="the job's function, its model load included")


def check_search(rows: list[dict], work: Path, device: torch.device, tiny: bool) -> None:
    from augbench.pool import PoolPart
    from augbench.search import search_block

    rng = np.random.default_rng(0)
    n, dim = size("pool_rows", tiny), 768
    (work / "pool/img_emb").mkdir(parents=True, exist_ok=True)
    (work / "pool/metadata").mkdir(parents=True, exist_ok=True)
    centres = rng.normal(size=(64, dim)).astype(np.float32)
    emb = np.empty((n, dim), np.float16)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        v = centres[rng.integers(0, 64, m)] + 0.7 * rng.normal(size=(m, dim)).astype(np.float32)
        emb[s:s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    np.save(work / "pool/img_emb/img_emb_0.npy", emb)
    meta = pd.DataFrame({"url": np.arange(n).astype(str), "caption": "c"})
    if os.environ.get("AUGBENCH_SMOKE_BREAK") == "search":  # the test's way to break one check: metadata short of rows
        meta = meta.iloc[:-1]
    meta.to_parquet(work / "pool/metadata/metadata_0.parquet")
    q = centres[rng.integers(0, 64, size("queries", tiny))] + 0.7 * rng.normal(size=(size("queries", tiny), dim)).astype(np.float32)
    np.save(work / "q.npy", (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32))
    pd.DataFrame({"label": np.arange(len(q)) % 8, "query": "q"}).to_parquet(work / "q.parquet")
    part = PoolPart("0", work / "pool/img_emb/img_emb_0.npy", work / "pool/metadata/metadata_0.parquet")
    k = size("k", tiny)
    spec = {"n_aug": k, "overfetch": 1, "margin": 1, "tile_rows": 131072}
    out = {}
    for dev in sorted({"cpu", device.type}):
        t = time.perf_counter()
        search_block([part], 0, {"image": (work / "q.npy", work / "q.parquet")}, work / f"s_{dev}.npz", spec, device=dev)
        figure(rows, f"search_block_{dev}_s", time.perf_counter() - t, "s", pool_rows=n, queries=len(q))
        out[dev] = np.load(work / f"s_{dev}.npz")
    if device.type == "cuda":
        a, b = out["cpu"], out["cuda"]
        def found(z: dict, i: int) -> set:
            return set(zip(z["image_parts"][i], z["image_rows"][i], strict=True))

        same = [found(a, i) == found(b, i) for i in range(len(q))]
        # a differing list is an fp16 tie when the k-th scores agree to fp16's resolution
        ties = sum(1 for i, s in enumerate(same) if not s and abs(float(a["image_scores"][i][-1]) - float(b["image_scores"][i][-1])) < 2e-3)
        figure(rows, "search_gpu_vs_cpu_lists_differing", len(same) - sum(same), "queries", fp16_ties=ties, queries=len(q))
        if len(same) - sum(same) > ties:
            raise AssertionError(f"GPU search differs from the CPU's beyond fp16 ties: {len(same) - sum(same) - ties} queries")


METHOD_KINDS = ("textual_inversion", "cond_vectors", "textual_inversion_dm", "cond_vectors_dm")


def check_personalize(rows: list[dict], work: Path, sd: Path, table: Path, classes: Path, device: torch.device, tiny: bool) -> None:
    from augbench.personalize import personalize_block
    from augbench.specs import PersonalizeSpec

    steps = size("personalize_steps", tiny)
    for method in METHOD_KINDS:
        spec = PersonalizeSpec(method=method, steps=steps, batch_size=4 if not tiny else 2)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t = time.perf_counter()
        personalize_block(sd, table, Path("/"), [("heron", 0, "heron")], work / f"p_{method}", work / f"pc_{method}", spec)
        sync(device)
        wall = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        figure(rows, f"personalize_{method}_s", wall, "s", steps=steps, resolution=size("resolution", tiny),
               steps_per_s=round(steps / wall, 2), peak_gpu_mb=None if np.isnan(peak) else round(peak))
    # four processes side by side, as profiles/slurm groups four blocks' chains on one GPU
    spec = json.dumps({"method": "textual_inversion_dm", "steps": steps, "batch_size": 4 if not tiny else 2})
    procs, started = [], time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "AUGBENCH_DEVICE": device.type}
    for i in range(4):
        cmd = [sys.executable, "-m", "augbench", "personalize", "--model", str(sd), "--table", str(table), "--root", "/",
               "--classes", str(classes), "--keys", "kayak", "--out", str(work / f"side{i}"), "--cache", str(work / f"side_cache{i}"),
               "--spec", spec, "--device", device.type]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate()[1][-2000:] for p in procs if p.wait() != 0]
    if errors:
        raise RuntimeError(f"personalize side by side: {len(errors)} of 4 failed: {errors[0]}")
    figure(rows, "personalize_4_side_by_side_s", time.perf_counter() - started, "s", processes=4, method="textual_inversion_dm")


def check_generate(rows: list[dict], work: Path, sd: Path, device: torch.device, tiny: bool) -> None:
    from augbench.generate import generate_block, set_scheduler
    from augbench.personalize import load_pipeline
    from augbench.specs import GenerateSpec

    n, bs, steps, res = size("images", tiny), size("batch", tiny), size("sd_steps", tiny), size("resolution", tiny)
    spec = GenerateSpec(method="prompt_classname", n_images=n, batch_size=bs, steps=steps, guidance_scale=7.5, resolution=res)
    os.environ["AUGBENCH_DEVICE"] = device.type
    sync(device)
    t = time.perf_counter()
    generate_block(sd, [("heron", 0, "heron")], work / "g", work / "g_cache", spec)
    sync(device)
    ours = n / (time.perf_counter() - t)
    pipe = load_pipeline(sd, device, torch.float16 if device.type == "cuda" else torch.float32)
    set_scheduler(pipe, "dpm")
    pipe(["a photo of a heron."] * bs, num_inference_steps=steps, guidance_scale=7.5, height=res, width=res)  # warm-up
    sync(device)
    t = time.perf_counter()
    for _ in range(n // bs):
        pipe(["a photo of a heron."] * bs, num_inference_steps=steps, guidance_scale=7.5, height=res, width=res)
    sync(device)
    bare = n / (time.perf_counter() - t)
    figure(rows, "generate_block_images_per_s", ours, "img/s", bare=round(bare, 3), ratio=round(ours / bare, 3), resolution=res,
           steps=steps, batch=bs, note="the block job includes its pipeline load and image encoding")


def check_train(rows: list[dict], work: Path, table: Path, device: torch.device, tiny: bool) -> None:
    from augbench.classify import train
    from augbench.decoded import decode_split
    from augbench.specs import TrainSpec

    inp, bs, steps = size("train_input", tiny), size("train_batch", tiny), size("train_steps", tiny)
    load = inp * 8 // 7
    decode_split(table, Path("/"), load, work / "decoded_train")
    decode_split(table, Path("/"), load, work / "decoded_test")
    spec = TrainSpec(arch="resnet50" if not tiny else "resnet10", input_size=inp, load_size=load, epochs=1, batch_size=bs,
                     min_steps=steps, checkpoint_every=10**6, amp=device.type == "cuda", channels_last=device.type == "cuda")
    os.environ["AUGBENCH_DEVICE"] = device.type
    sync(device)
    t = time.perf_counter()
    out = train([work / "decoded_train"], Path("/"), work / "decoded_test", [], 0, 0, 2, work / "m.json", work / "m.pt", spec)
    sync(device)
    wall = time.perf_counter() - t
    figure(rows, "train_images_per_s", int(out["steps"]) * bs / wall, "img/s", steps=int(out["steps"]), batch=bs, input=inp,
           arch=spec.arch, note="from the decode cache, evaluation and saving included")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes (the CPU test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", nargs="*", default=["embed", "search", "personalize", "generate", "train"])
    a = ap.parse_args()
    device = torch.device(a.device)
    work = Path(a.out) / "work"
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    figure(rows, "device", 0, "", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__)
    table, classes = build_photos(work, a.tiny)
    sd = build_sd(work / "sd", a.tiny, device) if {"personalize", "generate"} & set(a.only) else None
    clip = build_clip(work / "clip", a.tiny) if "embed" in a.only else None
    checks = {"embed": lambda: check_embed(rows, work, clip, device, a.tiny), "search": lambda: check_search(rows, work, device, a.tiny),
              "personalize": lambda: check_personalize(rows, work, sd, table, classes, device, a.tiny),
              "generate": lambda: check_generate(rows, work, sd, device, a.tiny),
              "train": lambda: check_train(rows, work, table, device, a.tiny)}
    failed = 0
    for name in a.only:
        try:
            checks[name]()
        except Exception as exc:  # one failing check must not hide the others' figures; the exit status says it failed
            failed += 1
            figure(rows, "error", 0, "", check=name, error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
    (Path(a.out) / "gpu_smoke.json").write_text(json.dumps(rows, indent=1))
    print("| figure | value | unit | details |\n|---|---:|---|---|")
    for r in rows:
        extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("figure", "value", "unit"))
        print(f"| {r['figure']} | {r['value']} | {r['unit']} | {extra} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
