"""Personalise a text-to-image diffusion model to one class from its few real training images.

Methods (the paper's section on personalisation):
- `textual_inversion`: one new pseudo-word per class, its input embedding initialised from the
  class name and optimised so the model reconstructs the class's images. Saved as
  `learned_embeds.safetensors` (`{token: tensor[1, dim]}`), which diffusers' `load_textual_inversion` loads.
- `cond_vectors`: the conditioning *sequence* (the text encoder's output) optimised per training
  image; `cond_clusters`: one such sequence per k-means cluster of the class's CLIP image embeddings.
  Saved as `cond.safetensors` (`cond [n_vectors, seq, dim]`, `assign [n_images]`).
- `*_dm`: the same jointly with the denoiser, fully (`unet/` folder) or through LoRA adapters
  (`pytorch_lora_weights.safetensors`, loaded with `load_lora_weights`). LoRA is the default because
  a full UNet per class is 3.4 GB for Stable Diffusion: 3.4 TB for ImageNet's 1,000 classes.

The VAE and the text encoder's weights are frozen in every method; only the tensors above train.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from augbench.device import pick_device
from augbench.imaging import decode_many, to_float
from augbench.io import atomic_dir, write_json, write_meta
from augbench.methods import method as registry_row
from augbench.prompts import CLASSNAME, IMAGENET_TEMPLATES
from augbench.specs import PersonalizeSpec, item_seed, spec_dict

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def token_for(class_key: str) -> str:
    """The pseudo-word of a class: `<key>`, one new token the tokenizer did not know."""
    return f"<{class_key}>"


def load_pipeline(model: str | Path, device: torch.device | None = None, dtype: torch.dtype = torch.float32):
    """`StableDiffusionPipeline.from_pretrained` on a folder or hub id, without the safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False,
                                                   feature_extractor=None, dtype=dtype)
    if len(pipe.tokenizer) < 10:
        raise ValueError(f"{model}: tokenizer has only {len(pipe.tokenizer)} tokens; is the pipeline folder complete?")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or torch.device("cpu"))


def resolution_of(pipe) -> int:
    """The image side the pipeline generates by default (UNet sample size x VAE factor)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def class_images(table: Path, root: Path, label: int, size: int) -> np.ndarray:
    """The real training images of one class (uint8 NHWC at `size`), in table order."""
    df = pd.read_parquet(table)
    df = df[df["label"] == label]
    if df.empty:
        raise ValueError(f"{table}: no training images with label {label}")
    arr, _ = decode_many(((i, str(root / p)) for i, p in enumerate(df["path"])), size, str(table))
    return arr


@torch.no_grad()
def encode_latents(pipe, images: np.ndarray) -> torch.Tensor:
    """Scaled VAE posterior means of the images and of their mirror images ([2n, c, h, w]: originals first)."""
    x = to_float(torch.from_numpy(images)) * 2 - 1
    x = torch.cat([x, x.flip(-1)]).to(pipe.device, pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def encode_prompt(pipe, prompts: list[str]) -> torch.Tensor:
    """The text encoder's output sequence for prompts (what the UNet is conditioned on)."""
    ids = pipe.tokenizer(prompts, padding="max_length", truncation=True, max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.device))[0]


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 50) -> np.ndarray:
    """Spherical k-means (k-means++ start) on L2-normalised rows; returns a cluster id per row."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-8)
    r = np.random.default_rng(seed)
    centres = [x[r.integers(len(x))]]
    for _ in range(1, k):
        d = np.min([1 - x @ c for c in centres], axis=0).clip(0)
        centres.append(x[r.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[r.integers(len(x))])
    c = np.stack(centres)
    assign = np.zeros(len(x), dtype=np.int64)
    for _ in range(iters):
        assign = np.argmax(x @ c.T, axis=1)
        new = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        new /= np.linalg.norm(new, axis=1, keepdims=True).clip(1e-8)
        if np.allclose(new, c):
            break
        c = new
    # renumber by first occurrence so that the numbering does not depend on the start
    order = {int(j): i for i, j in enumerate(dict.fromkeys(assign.tolist()))}
    return np.asarray([order[int(j)] for j in assign], dtype=np.int64)


def assignments(method: str, n_images: int, cluster_size: int, embeddings: np.ndarray | None, seed: int) -> np.ndarray:
    """Which conditioning vector each training image trains: its own, its cluster's, or the class's one."""
    learns = registry_row(method).learns
    if learns == "cond_vectors":
        return np.arange(n_images)
    if learns == "cond_clusters":
        if embeddings is None or len(embeddings) != n_images:
            got = None if embeddings is None else len(embeddings)
            raise ValueError(f"cond_clusters: need one CLIP embedding per training image, got {got} for {n_images} images")
        return kmeans(embeddings, max(1, math.ceil(n_images / cluster_size)), seed)
    return np.zeros(n_images, dtype=np.int64)


@dataclass
class Learned:
    """What a personalisation run produced (kept on the pipeline's modules for the DM variants)."""

    token: str | None = None
    cond: torch.Tensor | None = None
    assign: np.ndarray | None = None
    final_loss: float = float("nan")


def add_lora(unet, rank: int, seed: int) -> None:
    """Freeze the UNet and give its attention projections trainable LoRA adapters (peft).

    peft draws the A matrices from torch's global generator; it is seeded here (inside a forked RNG
    state, so the caller's stays as it was), else two runs of the same job personalise differently.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    devices = [unet.device.index or 0] if unet.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


def train_personalization(pipe, latents: torch.Tensor, assign: np.ndarray, class_key: str, class_name: str,
                          spec: PersonalizeSpec) -> Learned:
    """Optimise what `spec.method` personalises, in place on `pipe`'s modules, for `spec.steps` steps.

    `latents` holds the n images then their n mirror images; `assign[i]` is image i's vector.
    """
    method = spec.method
    m = registry_row(method)
    if not m.personalized:
        raise ValueError(f"personalize: method {method!r} learns nothing per class")
    dm = m.finetune_unet
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.unet.requires_grad_(False)
    from diffusers import DDPMScheduler

    # train with the DDPM form of the model's schedule (as diffusers' training examples do): the saved pipeline's
    # sampling scheduler (PNDM for SD v1.4, DPM-Solver, ...) need not have add_noise / get_velocity
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    n = len(assign)
    g = torch.Generator().manual_seed(item_seed(spec.seed, "personalize", method, class_key))
    groups: list[dict] = []
    learned = Learned(assign=assign)
    if m.learns == "pseudo_word":
        token = token_for(class_key)
        if pipe.tokenizer.add_tokens([token]) != 1:
            raise ValueError(f"textual_inversion: token {token!r} already exists in the tokenizer")
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
        emb = pipe.text_encoder.get_input_embeddings()
        tid = pipe.tokenizer.convert_tokens_to_ids(token)
        init = pipe.tokenizer(class_name, add_special_tokens=False).input_ids
        with torch.no_grad():
            emb.weight[tid] = emb.weight[init].mean(0)
        frozen = emb.weight.detach().clone()
        keep = torch.ones(len(frozen), dtype=torch.bool)
        keep[tid] = False
        emb.weight.requires_grad_(True)
        groups.append({"params": [emb.weight], "lr": spec.lr, "weight_decay": 0.0})
        learned.token = token
        # templates whose tokens would be cut before the pseudo-word would train nothing
        max_len = pipe.tokenizer.model_max_length
        fits = [t for t in IMAGENET_TEMPLATES if len(pipe.tokenizer(t.format(token), verbose=False).input_ids) <= max_len]
        templates = fits or [CLASSNAME]
    else:
        base = encode_prompt(pipe, [CLASSNAME.format(class_name)])
        cond = base.repeat(int(assign.max()) + 1, 1, 1).clone().requires_grad_(True)
        groups.append({"params": [cond], "lr": spec.lr, "weight_decay": 0.0})
        learned.cond = cond
    if dm:
        if spec.dm_finetune == "lora":
            add_lora(pipe.unet, spec.lora_rank, item_seed(spec.seed, "lora", method, class_key))
        elif spec.dm_finetune == "full":
            pipe.unet.requires_grad_(True)
        else:
            raise ValueError(f"personalize: dm_finetune must be 'full' or 'lora', got {spec.dm_finetune!r}")
        groups.append({"params": [p for p in pipe.unet.parameters() if p.requires_grad], "lr": spec.dm_lr, "weight_decay": 1e-2})
    opt = torch.optim.AdamW(groups)
    pipe.unet.train(dm)
    started, ema = time.time(), None
    assign_t = torch.from_numpy(np.concatenate([assign, assign]))
    for step in range(spec.steps):
        idx = torch.randint(0, 2 * n, (spec.batch_size,), generator=g)
        z0 = latents[idx]
        if learned.token is not None:
            picks = torch.randint(0, len(templates), (len(idx),), generator=g)
            prompts = [templates[int(j)].format(learned.token) for j in picks]
            ids = pipe.tokenizer(prompts, padding="max_length", truncation=True, max_length=pipe.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids
            c = pipe.text_encoder(ids.to(pipe.device))[0]
        else:
            c = learned.cond[assign_t[idx]]
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g)
        eps = torch.randn(z0.shape, generator=g).to(z0)
        zt = sched.add_noise(z0, eps, t.to(z0.device))
        pred = pipe.unet(zt, t.to(z0.device), encoder_hidden_states=c.to(pipe.unet.dtype)).sample
        # the model's own objective: SD 1.x predicts the noise, SD 2.x (768 px) the velocity
        target = eps if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, eps, t.to(z0.device))
        loss = F.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if learned.token is not None:
            with torch.no_grad():  # only the pseudo-word's row may move
                emb.weight[keep] = frozen[keep]
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % 50 == 0 or step == spec.steps - 1:
            log.info("personalize %s/%s: step %d/%d loss %.4f (%.0fs)", method, class_key, step, spec.steps, ema, time.time() - started)
    pipe.unet.eval()
    pipe.unet.requires_grad_(False)
    learned.final_loss = float(ema if ema is not None else float("nan"))
    return learned


def save_personalization(pipe, learned: Learned, method: str, spec: PersonalizeSpec, out: Path) -> None:
    """Write the learned tensors (and the UNet delta for the DM variants) to folder `out`."""
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        if learned.token is not None:
            tid = pipe.tokenizer.convert_tokens_to_ids(learned.token)
            vec = pipe.text_encoder.get_input_embeddings().weight[tid].detach().float().cpu()[None]
            save_file({learned.token: vec.contiguous()}, str(tmp / "learned_embeds.safetensors"))
        if learned.cond is not None:
            save_file({"cond": learned.cond.detach().float().cpu().contiguous(),
                       "assign": torch.from_numpy(learned.assign).contiguous()}, str(tmp / "cond.safetensors"))
        dm = registry_row(method).finetune_unet
        if dm:
            if spec.dm_finetune == "lora":
                from diffusers import StableDiffusionPipeline
                from diffusers.utils import convert_state_dict_to_diffusers
                from peft.utils import get_peft_model_state_dict

                layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
                StableDiffusionPipeline.save_lora_weights(str(tmp), unet_lora_layers=layers, safe_serialization=True)
            else:
                pipe.unet.save_pretrained(tmp / "unet")
        write_json(tmp / "personalization.json", {"method": method, "token": learned.token, "dm_finetune": spec.dm_finetune
                                                  if dm else None, "final_loss": learned.final_loss})


def personalize(model: str | Path, table: Path, root: Path, label: int, class_key: str, class_name: str, out: Path,
                spec: PersonalizeSpec, embeddings: tuple[Path, Path] | None = None) -> dict[str, float]:
    """Personalise `model` to one class (its rows of `table`) and save the result to folder `out`."""
    started = time.time()
    device = pick_device()
    pipe = load_pipeline(model, device)
    size = spec.resolution or resolution_of(pipe)
    images = class_images(table, root, label, size)
    emb = None
    if registry_row(spec.method).learns == "cond_clusters":
        if embeddings is None:
            raise ValueError("cond_clusters: the training split's CLIP embeddings are needed")
        meta = pd.read_parquet(embeddings[1])
        vecs = np.load(embeddings[0]).astype(np.float32)
        emb = vecs[(meta["label"] == label).to_numpy()]
    assign = assignments(spec.method, len(images), spec.cluster_size, emb, item_seed(spec.seed, "clusters", class_key))
    latents = encode_latents(pipe, images)
    log.info("personalize %s/%s: %d images at %dpx, %d vectors, device %s", spec.method, class_key, len(images), size,
             int(assign.max()) + 1, device)
    learned = train_personalization(pipe, latents, assign, class_key, class_name, spec)
    save_personalization(pipe, learned, spec.method, spec, out)
    stats = {"images": len(images), "vectors": int(assign.max()) + 1, "final_loss": learned.final_loss}
    write_meta(out, "personalize", spec_dict(spec), started, model=str(model), class_key=class_key, stats=stats)
    return stats
