"""Personalise a text-to-image diffusion model to one class from its few real training images.

Methods (the paper's section on personalisation):
- `textual_inversion`: one new pseudo-word per class, a row in each CLIP encoder's token matrix (SD 1.x / 2.x: one;
  SDXL: both), initialised from the class name and optimised so the model reconstructs the class's images. Saved as
  `learned_embeds.safetensors` (and `learned_embeds_2.safetensors` for the second encoder, as diffusers' SDXL
  textual-inversion example names them), `{token: tensor[1, dim]}`, which diffusers' `load_textual_inversion` loads.
- `cond_vectors`: the conditioning the pipeline takes (`prompt_embeds`, with `pooled_prompt_embeds` where the
  architecture has them; attention masks are carried along) optimised per training image; `cond_clusters`: one per
  k-means cluster of the class's CLIP image embeddings. Saved as `cond.safetensors` (`cond [n_vectors, seq, dim]`, the
  other tensors under their call names, `assign [n_images]`).
- `*_dm`: the same jointly with the denoiser, fully (`unet/` or `transformer/` folder) or through LoRA adapters
  (`pytorch_lora_weights.safetensors`, written by the pipeline's `save_lora_weights` and loaded with
  `load_lora_weights`). LoRA is the default because a full UNet per class is 3.4 GB for Stable Diffusion: 3.4 TB for
  ImageNet's 1,000 classes.

Every architecture of `augbench.architectures` trains with its own objective through `augbench.denoising`. The
autoencoder's and the text encoders' weights are frozen in every method; only the tensors above train.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from augbench.denoising import (
    architecture_of,
    denoiser_of,
    encode_images,
    encode_prompts,
    loss,
    noised,
    predict,
    trainable_conditioning,
    training_scheduler,
)
from augbench.device import pick_device
from augbench.imaging import decode_many, to_float
from augbench.io import atomic_dir, atomic_path, content_id, write_json, write_meta
from augbench.methods import method as registry_row
from augbench.prompts import CLASSNAME, IMAGENET_TEMPLATES
from augbench.specs import PersonalizeSpec, canonical_json, item_seed, spec_dict

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def token_for(class_key: str) -> str:
    """The pseudo-word of a class: `<key>`, one new token the tokenizer did not know."""
    return f"<{class_key}>"


def has_fp16_variant(model: str | Path) -> bool:
    """Whether a pipeline folder ships diffusers' fp16 variant files (`*.fp16.safetensors`): half the bytes to read."""
    folder = Path(model)
    return folder.is_dir() and any(folder.glob("*/*.fp16.safetensors"))


def load_pipeline(model: str | Path, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                  architecture: str | None = None):
    """A text-to-image pipeline from a folder or hub id, through the class its architecture names (augbench.architectures:
    declared, checked against `model_index.json`, or read from it): without the safety checker, with the fp16 variant
    files when loading in half precision and the folder has them."""
    import diffusers

    from augbench.architectures import resolve

    arch = resolve(model, architecture)
    variant = "fp16" if dtype == torch.float16 and has_fp16_variant(model) else None
    cls = getattr(diffusers, arch.text2image)
    extra = {"safety_checker": None, "requires_safety_checker": False, "feature_extractor": None} if arch.name == "sd" else {}
    pipe = cls.from_pretrained(str(model), dtype=dtype, variant=variant, **extra)
    for name, _ in arch.text_encoders:
        tokenizer = getattr(pipe, name.replace("text_encoder", "tokenizer"), None)
        if tokenizer is not None and len(tokenizer) < 10:
            raise ValueError(f"{model}: {name.replace('text_encoder', 'tokenizer')} has only {len(tokenizer)} tokens; "
                             "is the pipeline folder complete?")
    pipe.set_progress_bar_config(disable=True)
    pipe.augbench_architecture = arch.name
    return pipe.to(device or torch.device("cpu"))


class PipelineSource:
    """One pipeline load per worker process, shared by every class of a block.

    A class-block job (one process per method and block of classes) loads the model once; a personalised class loads
    its pseudo-word, LoRA adapter or fine-tuned UNet into it and takes it out again (`augbench.generate.personalisation_loaded`),
    so what one class learnt never reaches the next, and a class's result is the same as in a process of its own.
    """

    def __init__(self, model: str | Path, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                 architecture: str | None = None, offload: str = "none") -> None:
        self.model, self.device, self.dtype, self.architecture = model, device or torch.device("cpu"), dtype, architecture
        self.offload = offload
        self._base = None
        self.loads = 0

    def base(self):  # -> a diffusers text-to-image pipeline
        """The pipeline, loaded on first use: on the device, or with `offload` (model / sequential, on a GPU) on the
        host with diffusers' CPU offload hooks moving each module to the GPU while it runs (same pixels, less memory:
        FLUX.1 needs its 24 GB transformer on the card, not its 34 GB pipeline)."""
        if self._base is None:
            offload = self.offload if self.device.type == "cuda" else "none"
            if offload != self.offload:
                log.info("generate: offload %r has no effect on %s", self.offload, self.device)
            pipe = load_pipeline(self.model, self.device if offload == "none" else torch.device("cpu"), self.dtype,
                                 self.architecture)
            if offload == "model":
                pipe.enable_model_cpu_offload(device=self.device)
            elif offload == "sequential":
                pipe.enable_sequential_cpu_offload(device=self.device)
            self._base = pipe
            self.loads += 1
        return self._base


def compute_dtype(device: torch.device) -> torch.dtype:
    """The one dtype personalisation holds and runs its frozen modules in: bf16 on a GPU that has it, else fp16 (the
    loss is then scaled), fp32 on the CPU (where half precision is slow and runs stay bit-exact)."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class TrainingSource:
    """What a personalisation process holds, once: the pipeline as loaded (fp32, in host memory, never on the GPU) and
    each frozen module on the device in the compute dtype; per class, only what the method trains is its own.

    - VAE: frozen in every method, shared.
    - Text encoders: for textual inversion, each CLIP encoder is the class's own copy on the device (in the compute
      dtype, with the token-embedding matrix in fp32: the pseudo-word's row trains) with its own tokenizer. Every other
      method encodes one prompt per class, once: its text encoders stay on the host as loaded and never reach the GPU
      (FLUX.1's T5-XXL is 9.5 GB in bf16), and the conditioning moves to the device.
    - UNet: shared and frozen; LoRA adapters (fp32) are added for a class and removed after it (`release`), so no
      class sees another's; a full fine-tune gets its own fp32 copy.

    So a Stable Diffusion v1 process holds 0.9 B frozen parameters once in bf16 (~1.9 GB) instead of an fp32 pipeline
    (~4 GB) and a per-class fp32 copy of UNet and text encoder, and no step casts frozen weights from one half
    precision to the other. On the CPU in fp32 the shared modules are the loaded ones themselves.
    """

    def __init__(self, model: str | Path, device: torch.device | None = None, compute: torch.dtype | None = None,
                 architecture: str | None = None, gradient_checkpointing: bool = False) -> None:
        self.model, self.device, self.architecture = model, device or torch.device("cpu"), architecture
        self.gradient_checkpointing = gradient_checkpointing
        self.compute = compute or compute_dtype(self.device)
        self._host = None
        self._frozen: dict[str, torch.nn.Module] = {}
        self.loads = 0

    def host(self):  # -> a diffusers text-to-image pipeline
        """The pipeline as loaded, fp32 on the CPU: the pristine source of every copy."""
        if self._host is None:
            self._host = load_pipeline(self.model, torch.device("cpu"), torch.float32, self.architecture)
            for module in self._host.components.values():
                if isinstance(module, torch.nn.Module):
                    module.requires_grad_(False)
            self.loads += 1
        return self._host

    def _placed(self, module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        """A copy of a host module on the device in `dtype` (the module itself where that changes nothing)."""
        if self.device.type == "cpu" and dtype == torch.float32:
            return module
        return copy.deepcopy(module).to(self.device, dtype)

    def frozen(self, name: str) -> torch.nn.Module:
        """Module `name` of the pipeline on the device in the compute dtype, made once and shared by every class."""
        if name not in self._frozen:
            self._frozen[name] = self._placed(getattr(self.host(), name), self.compute).eval()
        return self._frozen[name]

    def pipeline(self, method: str, dm_finetune: str = "lora"):  # -> a pipeline of the host's class
        """A pipeline for one class of `method`: the shared frozen modules and the class's own trainable ones (for a
        pseudo-word, its copy of each CLIP encoder and tokenizer; for a full fine-tune, its fp32 denoiser)."""
        m, host = registry_row(method), self.host()
        arch = architecture_of(host)
        encoders = {name for name, _ in arch.text_encoders}
        parts = {name: (value if name in encoders else self.frozen(name)) if isinstance(value, torch.nn.Module) else value
                 for name, value in host.components.items()}
        if m.learns == "pseudo_word":  # the class's own vocabulary: a copy of each CLIP encoder and tokenizer
            for encoder, kind in arch.text_encoders:
                if kind == "clip":
                    parts[encoder] = copy.deepcopy(getattr(host, encoder)).to(self.device, self.compute)
                    tokenizer = encoder.replace("text_encoder", "tokenizer")
                    parts[tokenizer] = copy.deepcopy(getattr(host, tokenizer))
        if m.finetune_unet and dm_finetune == "full":
            parts[arch.denoiser] = copy.deepcopy(getattr(host, arch.denoiser)).to(self.device, torch.float32)
        if "requires_safety_checker" in inspect.signature(type(host).__init__).parameters:
            parts["requires_safety_checker"] = False
        pipe = type(host)(**parts)
        pipe.set_progress_bar_config(disable=True)
        pipe.augbench_architecture = arch.name
        return pipe

    def release(self, pipe) -> None:
        """Give back what a class added to the shared modules: its LoRA adapters on the shared denoiser."""
        denoiser = denoiser_of(pipe)
        if getattr(denoiser, "peft_config", None):
            denoiser.delete_adapters(list(denoiser.peft_config))


#: Activation memory of one training image's UNet forward and backward at 512 px in a half compute dtype (MB), by
#: method kind: measured on the CPU (bf16) with a randomly initialised pipeline of Stable Diffusion 1.5's shapes by
#: `benchmarks/personalize_memory.py`, and scaled by the pixel count at other sizes. An estimate until the GPU check
#: (scripts/gpu_smoke.py) measures a process on a GPU.
ACTIVATION_MB_512 = {"pseudo_word": 723.0, "cond_vectors": 704.0, "lora": 855.0}  # from 64 and 128 px (2026-12-03)
#: The share of ACTIVATION_MB_512 autograd keeps with the denoiser's gradient checkpointing on, measured by
#: `benchmarks/personalize_memory.py --gradient-checkpointing` on the same SD 1.5-shaped pipeline.
CHECKPOINTED_SHARE = {"lora": 0.17, "cond_vectors": 0.2}  # 143 / 855 and 143 / 704 MB at 512 px (2026-12-04)
CUDA_CONTEXT_MB = 600  # what a process holds on a GPU before its first tensor (CUDA context, cuBLAS / cuDNN workspaces)


#: Stable Diffusion v1's parameter counts (UNet2DConditionModel with cross_attention_dim 768, the CLIP ViT-L/14 text
#: tower, AutoencoderKL at four levels), as `param_counts` reads them; tests/unit/test_plan.py recounts them from the
#: classes on the meta device.
SD1_PARAMS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863, "token_rows": 49_408, "hidden": 768,
              "seq": 77, "lora_per_rank": 199_296}  # rank 4: 797,184, the known SD LoRA size


def param_counts(pipe) -> dict[str, int]:
    """What `memory_estimate` needs of a pipeline: parameters per module, the token matrix, the conditioning sequence's
    shape, and LoRA parameters per unit of rank on LORA_TARGETS."""
    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    rows, hidden = pipe.text_encoder.get_input_embeddings().weight.shape
    lora = sum(m.in_features + m.out_features for n, m in pipe.unet.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in LORA_TARGETS))
    return {"unet": count(pipe.unet), "text_encoder": count(pipe.text_encoder), "vae": count(pipe.vae), "token_rows": rows,
            "hidden": hidden, "seq": pipe.tokenizer.model_max_length, "lora_per_rank": lora}


def memory_estimate(counts: dict[str, int], method: str, spec: PersonalizeSpec, compute_bytes: int = 2, vectors: int = 1,
                    resolution: int = 512, step_cost: float | None = None,
                    gradient_checkpointing: bool = False) -> dict[str, float]:
    """Estimated peak device memory (MB) of one personalisation process of `method` (as TrainingSource holds it), from
    parameter counts (`param_counts`, SD1_PARAMS or `Architecture.param_counts`): frozen modules once in the compute
    dtype (the text encoders only for a pseudo-word: other methods encode on the host); what trains in fp32 with its
    gradient and AdamW's two moments (16 bytes per parameter); `vectors` conditioning sequences; activations
    (ACTIVATION_MB_512 per image of the batch, measured on SD v1, scaled by the step cost: pixels for SD v1, else
    `Architecture.step_cost`; CHECKPOINTED_SHARE of it under gradient checkpointing); the CUDA context. `per_gpu` turns
    it into the number of processes one GPU holds."""
    m = registry_row(method)
    full = m.finetune_unet and spec.dm_finetune == "full"
    frozen = counts["vae"] + (0 if full else counts["unet"])
    trainable = counts["unet"] if full else 0
    if m.learns == "pseudo_word":
        frozen += counts["text_encoder"] - counts["token_rows"] * counts["hidden"]
        trainable += (counts["token_rows"] + 1) * counts["hidden"]  # the token matrix in fp32, one row more
    else:
        trainable += vectors * counts["seq"] * counts.get("cond_width", counts["hidden"])
    if m.finetune_unet and not full:
        trainable += spec.lora_rank * counts["lora_per_rank"]
    kind = "lora" if m.finetune_unet else ("pseudo_word" if m.learns == "pseudo_word" else "cond_vectors")
    side = spec.resolution or resolution
    cost = (side / 512) ** 2 if step_cost is None else step_cost
    share = CHECKPOINTED_SHARE[kind] if gradient_checkpointing and kind in CHECKPOINTED_SHARE else 1.0
    mb = 2**20
    parts = {"frozen_mb": frozen * compute_bytes / mb, "trainable_mb": trainable * 16 / mb,
             "activations_mb": ACTIVATION_MB_512[kind] * spec.batch_size * cost * share, "context_mb": CUDA_CONTEXT_MB}
    parts["total_mb"] = sum(parts.values())
    return {k: round(v, 1) for k, v in parts.items()}


def per_gpu(gpu_mb: float, process_mb: float, headroom: float = 0.9) -> int:
    """How many personalisation processes one GPU of `gpu_mb` holds side by side (`headroom`: the share of the card
    planned on, for fragmentation and the allocator's cache)."""
    return max(0, int(gpu_mb * headroom // process_mb))


def link_tree_file(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (a copy across filesystems): an output that costs no bytes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path) -> None:
    """`dst` as a tree of hard links to `src`'s files: a block's outputs cost no bytes."""
    for f in sorted(src.rglob("*")):
        if f.is_file():
            link_tree_file(f, dst / f.relative_to(src))


def resolution_of(pipe) -> int:
    """The image side the pipeline generates by default: the denoiser's sample size (in latent pixels) x the
    autoencoder's factor, or the pipeline's own `default_sample_size` where the denoiser has none (FLUX)."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    size = getattr(denoiser.config, "sample_size", None) or pipe.default_sample_size
    return int(size * pipe.vae_scale_factor)


def _class_paths(table: Path, root: Path, label: int) -> list[str]:
    df = pd.read_parquet(table)
    df = df[df["label"] == label]
    if df.empty:
        raise ValueError(f"{table}: no training images with label {label}")
    return [str(root / p) for p in df["path"]]


def class_images(table: Path, root: Path, label: int, size: int) -> np.ndarray:
    """The real training images of one class (uint8 NHWC at `size`), in table order: the shorter side resized to
    `size` and the central square cut out (torchvision's Resize + CenterCrop, what img2img starts from), never squashed."""
    paths = _class_paths(table, root, label)
    arr, _ = decode_many(enumerate(paths), size, str(table), fit="crop")
    return arr


CROP_POSITIONS = (0.5, 0.0, 1.0)  # where along the longer side a training crop is cut: the centre first, then the ends


def class_views(table: Path, root: Path, label: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The training crops of one class's images for personalisation: (uint8 NHWC at `size`, image index of each crop).

    Each image is resized on its shorter side to `size` (never squashed); a square image is one crop, any other gives
    its central square and the squares at both ends of its longer side (CROP_POSITIONS), so a training step sees a
    random crop as diffusers' DreamBooth / LoRA scripts do (Resize + RandomCrop), from crops encoded once.
    Undecodable images are skipped (counted and logged by decode_many).
    """
    from augbench.imaging import UndecodableImage, open_rgb

    views, owner = [], []
    skips = 0
    for i, path in enumerate(_class_paths(table, root, label)):
        try:
            img = open_rgb(path)
        except UndecodableImage as exc:
            skips += 1
            log.warning("personalize: skipping undecodable image %s", exc)
            continue
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        offsets = sorted({round(p * (max(nw, nh) - size)) for p in CROP_POSITIONS}, key=lambda o: abs(o - (max(nw, nh) - size) / 2))
        for o in offsets:
            box = (o, 0, o + size, size) if nw >= nh else (0, o, size, o + size)
            views.append(np.asarray(img.crop(box), dtype=np.uint8))
            owner.append(i)
    if not views:
        raise ValueError(f"{table}: no decodable training image with label {label} ({skips} skipped)")
    return np.stack(views), np.asarray(owner, dtype=np.int64)


@torch.no_grad()
def encode_latents(pipe, images: np.ndarray, micro_batch: int = 16) -> torch.Tensor:
    """Scaled VAE posterior means of the images (or crops) and of their mirror images ([2n, c, h, w]: originals first).

    At most `micro_batch` images reach the VAE at once: SD's encoder at 512 px holds about 130 MiB of activations
    per image, so one call over a 260-image class and its mirrors would need tens of GiB.
    """
    out = []
    for flip in (False, True):
        for i in range(0, len(images), micro_batch):
            x = to_float(torch.from_numpy(images[i:i + micro_batch])) * 2 - 1
            x = (x.flip(-1) if flip else x).to(pipe.vae.device, pipe.vae.dtype)
            out.append(encode_images(pipe, x))
    return torch.cat(out)


@torch.no_grad()
def encode_prompt(pipe, prompts: list[str]) -> torch.Tensor:
    """The text encoders' output sequence for prompts (what the denoiser is conditioned on: `prompt_embeds`)."""
    return encode_prompts(pipe, prompts)["prompt_embeds"]


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
    cond: dict[str, torch.Tensor] | None = None  # the conditioning by call name ([n_vectors, ...] each)
    assign: np.ndarray | None = None
    final_loss: float = float("nan")


def add_lora(unet, rank: int, seed: int) -> None:
    """Freeze the denoiser (UNet or transformer) and give its attention projections trainable LoRA adapters (peft).

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
                          spec: PersonalizeSpec, owner: np.ndarray | None = None,
                          gradient_checkpointing: bool = False) -> Learned:
    """Optimise what `spec.method` personalises, in place on `pipe`'s modules, for `spec.steps` steps; with
    `gradient_checkpointing` the denoiser recomputes its activations in the backward pass (same result, less memory).

    `latents` holds the m crops then their m mirror images; `owner[j]` is the image crop j was cut from (default: one
    crop per image) and `assign[i]` is image i's vector, so every crop of an image trains that image's vector.
    """
    method = spec.method
    m = registry_row(method)
    if not m.personalized:
        raise ValueError(f"personalize: method {method!r} learns nothing per class")
    sched, compute = _frozen_for_training(pipe)
    owner = np.arange(len(assign)) if owner is None else owner
    if len(latents) != 2 * len(owner):
        raise ValueError(f"personalize: {len(latents)} latents for {len(owner)} crops (expected crops and their mirrors)")
    n = len(owner)
    g = torch.Generator().manual_seed(item_seed(spec.seed, "personalize", method, class_key))
    groups: list[dict] = []
    learned = Learned(assign=assign)
    templates: list[str] = []
    if m.learns == "pseudo_word":
        learned.token = token_for(class_key)
        rows, templates = _pseudo_word_rows(pipe, [learned.token], [class_name], compute)
        groups += [{"params": [p], "lr": spec.lr, "weight_decay": 0.0} for p in rows]
    else:
        with torch.no_grad():  # once per class, where the text encoders are (the host, for these methods)
            base = encode_prompts(pipe, [CLASSNAME.format(class_name)])
        k = int(assign.max()) + 1
        learned.cond = {}
        for name, value in base.items():
            trains = trainable_conditioning(name)
            value = value.to(latents.device)
            value = (value.float() if trains else value).repeat(k, *[1] * (value.dim() - 1)).clone()
            learned.cond[name] = value.requires_grad_(True) if trains else value
        groups.append({"params": [v for v in learned.cond.values() if v.requires_grad], "lr": spec.lr, "weight_decay": 0.0})
    if m.finetune_unet:
        groups.append(_denoiser_group(pipe, spec, item_seed(spec.seed, "lora", method, class_key)))
    assign_t = torch.from_numpy(np.concatenate([assign[owner], assign[owner]]))

    def batch() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.randint(0, 2 * n, (spec.batch_size,), generator=g)
        if learned.token is None:
            return latents[idx], {name: value[assign_t[idx]] for name, value in learned.cond.items()}
        picks = torch.randint(0, len(templates), (len(idx),), generator=g)
        with _autocast(latents.device, compute):
            return latents[idx], encode_prompts(pipe, [templates[int(j)].format(learned.token) for j in picks])

    run = _Run(pipe, spec, torch.optim.AdamW(groups), sched, compute, g, f"{method}/{class_key}")
    learned.final_loss = run.train(batch, spec.steps, m.finetune_unet, gradient_checkpointing)
    return learned


def _frozen_for_training(pipe) -> tuple[object, torch.dtype]:
    """Freeze every module of the pipeline; return the model's schedule in its training form (augbench.denoising:
    DDPM for noise models, whose saved sampler (PNDM for SD v1.4, DPM-Solver, ...) need not have add_noise; the
    flow-matching schedule for flow models) and the compute dtype (the VAE's: it is frozen in every method)."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return training_scheduler(pipe), pipe.vae.dtype


def _denoiser_group(pipe, spec: PersonalizeSpec, seed: int) -> dict:
    """The optimiser group of the denoiser's trainable part: LoRA adapters (fp32 beside the frozen half-precision
    layers) or, `dm_finetune: full`, every weight."""
    denoiser = denoiser_of(pipe)
    if spec.dm_finetune == "lora":
        add_lora(denoiser, spec.lora_rank, seed)
        for p in denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    elif spec.dm_finetune == "full":
        denoiser.requires_grad_(True)
    else:
        raise ValueError(f"personalize: dm_finetune must be 'full' or 'lora', got {spec.dm_finetune!r}")
    return {"params": [p for p in denoiser.parameters() if p.requires_grad], "lr": spec.dm_lr, "weight_decay": 1e-2}


class _Run:
    """The training steps every personalisation shares: a batch of latents and their conditioning, the architecture's
    objective (noise or flow matching, augbench.denoising), a scaled backward pass and an AdamW step."""

    def __init__(self, pipe, spec: PersonalizeSpec, opt: torch.optim.Optimizer, sched, compute: torch.dtype,
                 g: torch.Generator, label: str) -> None:
        self.pipe, self.spec, self.opt, self.sched, self.compute, self.g, self.label = pipe, spec, opt, sched, compute, g, label
        self.device = pipe.vae.device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=compute == torch.float16)  # fp16: a scaled loss
        self.ema: float | None = None

    def train(self, batch, steps: int, dm: bool, gradient_checkpointing: bool, start: int = 0,
              on_step=None) -> float:  # -> the final loss (an EMA over the steps)
        """Steps `start` .. `steps` - 1, each from `batch()` -> (clean latents, conditioning by call name);
        `on_step(step)` runs after each (a checkpoint)."""
        denoiser = denoiser_of(self.pipe)
        denoiser.train(dm)
        if gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        started = time.time()
        try:
            for step in range(start, steps):
                z0, c = batch()
                zt, t, target, weight = noised(self.pipe, self.sched, z0, self.g)
                with _autocast(self.device, self.compute):
                    c = {k: v.to(self.compute) if v.is_floating_point() else v for k, v in c.items()}
                    pred = predict(self.pipe, zt, t, c)
                # the model's own objective: noise (SD 1.x) or velocity (SD 2.x 768 px) prediction, or flow matching
                step_loss = loss(pred, target, weight)
                self.opt.zero_grad(set_to_none=True)
                self.scaler.scale(step_loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
                self.ema = step_loss.item() if self.ema is None else 0.9 * self.ema + 0.1 * step_loss.item()
                if step % 50 == 0 or step == steps - 1:
                    log.info("personalize %s: step %d/%d loss %.4f (%.0fs)", self.label, step, steps, self.ema,
                             time.time() - started)
                if on_step is not None:
                    on_step(step)
        finally:
            if gradient_checkpointing:
                denoiser.disable_gradient_checkpointing()
            denoiser.eval()
            denoiser.requires_grad_(False)
        return float(self.ema if self.ema is not None else float("nan"))


def _pseudo_word_rows(pipe, tokens: list[str], names: list[str], compute: torch.dtype) -> tuple[list, list[str]]:
    """Add each pseudo-word of `tokens` to every CLIP tokenizer and its encoder's token matrix (SDXL: both, each its
    own tensor), initialised from its class name; return the trainable matrices and the prompt templates that fit."""
    arch = architecture_of(pipe)
    rows, tokenizers = [], []
    for encoder_name, kind in arch.text_encoders:
        if kind != "clip":
            continue
        encoder, tokenizer = getattr(pipe, encoder_name), getattr(pipe, encoder_name.replace("text_encoder", "tokenizer"))
        rows.append(_pseudo_word_row(encoder, tokenizer, tokens, names, compute))
        tokenizers.append(tokenizer)
    if not tokenizers:
        raise ValueError(f"textual_inversion: {arch.name} ({arch.text2image}) has no CLIP text encoder")
    # templates whose tokens would be cut before the pseudo-word would train nothing
    longest = max(tokens, key=len)
    fits = [t for t in IMAGENET_TEMPLATES
            if all(len(tok(t.format(longest), verbose=False).input_ids) <= tok.model_max_length for tok in tokenizers)]
    return rows, fits or [CLASSNAME]


def _pseudo_word_row(encoder, tokenizer, tokens: list[str], names: list[str], compute: torch.dtype) -> torch.nn.Parameter:
    """Add `tokens` to a CLIP tokenizer and its encoder's token matrix, each initialised as the mean of its class
    name's tokens; return the matrix, made trainable in fp32 with every row but the new ones' gradients zeroed."""
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise ValueError(f"textual_inversion: a token of {tokens[:3]}... already exists in the tokenizer")
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = encoder.get_input_embeddings().float()  # trainable: fp32, whatever the encoder's dtype
    row = torch.zeros(len(emb.weight), 1, device=emb.weight.device)
    with torch.no_grad():
        for token, name in zip(tokens, names, strict=True):
            tid = tokenizer.convert_tokens_to_ids(token)
            emb.weight[tid] = emb.weight[tokenizer(name, add_special_tokens=False).input_ids].mean(0)
            row[tid] = 1
    # only the pseudo-words' rows may move: the other rows' gradients are zeroed, so AdamW (no weight decay here)
    # leaves them exactly as they were, without a second copy of the matrix to restore them from
    emb.weight.requires_grad_(True)
    emb.weight.register_hook(lambda grad: grad * row)
    if compute != torch.float32:  # the rest of the encoder runs in the compute dtype: so do the looked-up rows
        emb.register_forward_hook(lambda _module, _args, out: out.to(compute))
    return emb.weight


def pseudo_word_files(pipe) -> dict[str, str]:
    """Each CLIP encoder of the pipeline and the file its pseudo-word row is saved in: `learned_embeds.safetensors`
    for `text_encoder`, `learned_embeds_2.safetensors` for `text_encoder_2` (diffusers' SDXL example's names)."""
    return {enc: f"learned_embeds{enc.removeprefix('text_encoder')}.safetensors"
            for enc, kind in architecture_of(pipe).text_encoders if kind == "clip"}


def save_personalization(pipe, learned: Learned, method: str, spec: PersonalizeSpec, out: Path) -> None:
    """Write the learned tensors (and the UNet delta for the DM variants) to folder `out`."""
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        if learned.token is not None:
            save_pseudo_word(pipe, learned.token, tmp)
        if learned.cond is not None:
            tensors = {("cond" if name == "prompt_embeds" else name): value.detach().cpu().contiguous()
                       for name, value in learned.cond.items()}
            tensors["assign"] = torch.from_numpy(learned.assign).contiguous()
            save_file(tensors, str(tmp / "cond.safetensors"))
        dm = registry_row(method).finetune_unet
        if dm:
            save_denoiser(pipe, spec.dm_finetune, tmp)
        write_json(tmp / "personalization.json", {"method": method, "token": learned.token, "dm_finetune": spec.dm_finetune
                                                  if dm else None, "final_loss": learned.final_loss})


def save_pseudo_word(pipe, token: str, folder: Path) -> None:
    """A pseudo-word's row of each CLIP encoder, `{token: [1, dim]}` in the file `pseudo_word_files` names."""
    from safetensors.torch import save_file

    for encoder, weight_name in pseudo_word_files(pipe).items():
        tokenizer = getattr(pipe, encoder.replace("text_encoder", "tokenizer"))
        vec = getattr(pipe, encoder).get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)]
        save_file({token: vec.detach().float().cpu()[None].contiguous()}, str(folder / weight_name))


def save_denoiser(pipe, dm_finetune: str, folder: Path) -> None:
    """What the denoiser learnt: its LoRA adapters through the pipeline class's `save_lora_weights` (a UNet's keys in
    diffusers' format, a transformer's as peft's, as diffusers' LoRA examples write them), or the whole fine-tuned
    denoiser in `unet/` or `transformer/`."""
    arch, denoiser = architecture_of(pipe), denoiser_of(pipe)
    if dm_finetune != "lora":
        denoiser.save_pretrained(folder / arch.denoiser)
        return
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(denoiser)
    if arch.denoiser == "unet":
        layers = convert_state_dict_to_diffusers(layers)
    type(pipe).save_lora_weights(str(folder), **{f"{arch.denoiser}_lora_layers": layers}, safe_serialization=True)


def _autocast(device: torch.device, compute: torch.dtype):  # -> context manager
    """Autocast to the compute dtype the frozen modules are held in (their weights are not cast again: only the small
    fp32 trainable tensors are); nothing in fp32 (CPU runs stay bit-exact)."""
    return nullcontext() if compute == torch.float32 else torch.autocast(device.type, dtype=compute)


def cache_ident(spec: PersonalizeSpec, model: str | Path, class_key: str, table: Path,
                embeddings: tuple[Path, Path] | None) -> dict[str, object]:
    """What fixes one class's personalisation: the spec and the content of the model, the table and the embeddings."""
    ident: dict[str, object] = {"spec": spec_dict(spec), "class": class_key, "table": content_id(table),
                                "model": content_id(model) if Path(model).exists() else str(model)}
    if embeddings is not None:
        ident["embeddings"] = [content_id(p) for p in embeddings]
    return ident


def personalize_class(source: TrainingSource, table: Path, root: Path, label: int, class_key: str, class_name: str,
                      cache: Path, spec: PersonalizeSpec, embeddings: tuple[Path, Path] | None = None) -> tuple[Path, dict]:
    """One class's personalisation folder, from the cache (`cache/<key>/`, keyed by content) or made now."""
    ident = cache_ident(spec, source.model, class_key, table, embeddings)
    out = cache / hashlib.sha256(canonical_json(ident).encode()).hexdigest()[:16]
    if (out / "personalization.json").exists():
        log.info("personalize %s/%s: cached in %s", spec.method, class_key, out)
        return out, {"cached": True}
    started = time.time()
    m = registry_row(spec.method)
    pipe = source.pipeline(spec.method, spec.dm_finetune)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)  # each class's own peak
    try:
        return out, _personalize(pipe, m, table, root, label, class_key, class_name, spec, embeddings, out, ident, started,
                                 source.gradient_checkpointing)
    finally:
        source.release(pipe)


def _personalize(pipe, m, table: Path, root: Path, label: int, class_key: str, class_name: str, spec: PersonalizeSpec,
                 embeddings: tuple[Path, Path] | None, out: Path, ident: dict, started: float,
                 gradient_checkpointing: bool = False) -> dict:
    size = spec.resolution or resolution_of(pipe)
    views, owner = class_views(table, root, label, size)
    images = np.unique(owner)  # the images that decoded (assignments are per image; crops follow their image)
    emb = None
    if m.learns == "cond_clusters":
        if embeddings is None:
            raise ValueError("cond_clusters: the training split's CLIP embeddings are needed")
        meta = pd.read_parquet(embeddings[1])
        vecs = np.load(embeddings[0]).astype(np.float32)
        emb = vecs[(meta["label"] == label).to_numpy()]
    n_images = int(owner.max()) + 1
    assign = assignments(spec.method, n_images, spec.cluster_size, emb, item_seed(spec.seed, "clusters", class_key))
    latents = encode_latents(pipe, views, spec.encode_batch)
    log.info("personalize %s/%s: %d images (%d crops) at %dpx, %d vectors, device %s", spec.method, class_key, len(images),
             len(views), size, int(assign.max()) + 1, pipe.device)
    learned = train_personalization(pipe, latents, assign, class_key, class_name, spec, owner,
                                    gradient_checkpointing)
    save_personalization(pipe, learned, spec.method, spec, out)
    write_json(out / "ident.json", ident)
    stats = {"images": len(images), "vectors": int(assign.max()) + 1, "final_loss": learned.final_loss,
             "seconds": round(time.time() - started, 1)}
    if pipe.device.type == "cuda":
        stats["max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated(pipe.device) / 2**20)
    return stats


def personalize_block(model: str | Path, table: Path, root: Path, classes: list[tuple[str, int, str]], out: Path,
                      cache: Path, spec: PersonalizeSpec, embeddings: tuple[Path, Path] | None = None,
                      architecture: str | None = None, gradient_checkpointing: bool = False) -> dict[str, object]:
    """Personalise `model` to each class of a block in one process (the model is loaded once) and write the block's
    folder `out/<class key>/` (links to the per-class cache under `cache/<class key>/`, so a killed block keeps the
    classes it finished)."""
    if registry_row(spec.method).shared:
        return personalize_shared(model, table, root, classes, out, cache, spec, architecture, gradient_checkpointing)
    started = time.time()
    source = TrainingSource(model, pick_device(), architecture=architecture, gradient_checkpointing=gradient_checkpointing)
    per_class = {}
    with atomic_dir(out) as tmp:
        for key, label, name in classes:
            folder, per_class[key] = personalize_class(source, table, root, label, key, name, cache / key, spec, embeddings)
            link_tree(folder, tmp / key)
    stats = {"classes": len(classes), "pipeline_loads": source.loads, "per_class": per_class}
    write_meta(out, "personalize", spec_dict(spec), started, model=str(model), stats=stats)
    log.info("personalize %s: %d classes, %d pipeline load(s) in %.1fs", spec.method, len(classes), source.loads,
             time.time() - started)
    return {k: v for k, v in stats.items() if k != "per_class"}


SHARED_CHECKPOINT_EVERY = 50  # steps between the shared adapter's checkpoints: a killed run resumes from the last one


def personalize_shared(model: str | Path, table: Path, root: Path, classes: list[tuple[str, int, str]], out: Path,
                       cache: Path, spec: PersonalizeSpec, architecture: str | None = None,
                       gradient_checkpointing: bool = False) -> dict[str, object]:
    """One adapter for the whole dataset (`shared_adapter`, as Diff-Mix and DataDream train): a LoRA on the denoiser
    trained jointly with one pseudo-word per class for `spec.shared_steps` steps, so 1,000 classes cost one fine-tune.

    Each class's crops are encoded once, one class at a time, and appended to one latent file under the run's work
    folder (`_shared_latents`), read memory-mapped: memory does not grow with the classes. A step draws `batch_size` crops across all
    classes, each prompted with its class's pseudo-word. The run writes a checkpoint (adapter, token rows, optimiser,
    loss scale and random state) every SHARED_CHECKPOINT_EVERY steps and resumes from it when killed, to the same bytes.
    `out/<class key>/` holds the class's pseudo-word (`learned_embeds*.safetensors`) and a hard link to the one
    `pytorch_lora_weights.safetensors`: what the generate job loads per class, as for the per-class methods."""
    started = time.time()
    keys = [k for k, _, _ in classes]
    ident = cache_ident(spec, model, ",".join(keys), table, None)
    done = cache / hashlib.sha256(canonical_json(ident).encode()).hexdigest()[:16]
    source = TrainingSource(model, pick_device(), architecture=architecture, gradient_checkpointing=gradient_checkpointing)
    stats: dict[str, object] = {"classes": len(classes), "cached": True}
    if not (done / "personalization.json").exists():
        stats = _train_shared(source, table, root, classes, spec, done, ident)
    with atomic_dir(out) as tmp:
        for key in keys:
            link_tree(done / key, tmp / key)
    stats["pipeline_loads"] = source.loads
    write_meta(out, "personalize", spec_dict(spec), started, model=str(model), stats=stats)
    log.info("personalize %s: %d classes in one adapter in %.1fs", spec.method, len(classes), time.time() - started)
    return stats


def _shared_latents(pipe, table: Path, root: Path, classes: list[tuple[str, int, str]], spec: PersonalizeSpec,
                    work: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every class's crops and mirrors encoded once, one class at a time, appended to one raw file (`latents.f32`; its
    index `latents.json` records each class's rows and is rewritten after each class, so a killed run keeps the
    classes it encoded), and mapped read-only: (latents [rows, c, h, w] memory-mapped, class of each row). One file,
    not one per class: a memory map holds a file descriptor, and 1,000 of them reach the usual limit."""
    data, index_path = work / "latents.f32", work / "latents.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"shape": None, "counts": []}
    size = spec.resolution or resolution_of(pipe)
    with open(data, "ab") as f:
        rows = sum(index["counts"])
        if index["shape"] is not None:  # a write the index does not record (a killed run) is cut off
            f.truncate(rows * int(np.prod(index["shape"])) * 4)
        for key, label, _ in classes[len(index["counts"]):]:
            views, _owner = class_views(table, root, label, size)
            lat = encode_latents(pipe, views, spec.encode_batch).cpu().numpy().astype(np.float32, copy=False)
            f.write(lat.tobytes())
            f.flush()
            os.fsync(f.fileno())
            index = {"shape": list(lat.shape[1:]), "counts": [*index["counts"], len(lat)]}
            write_json(index_path, index)
            log.info("personalize %s: %s encoded (%d crops and mirrors)", spec.method, key, len(lat))
    counts = index["counts"]
    latents = np.memmap(data, dtype=np.float32, mode="r", shape=(sum(counts), *index["shape"]))
    return latents, np.repeat(np.arange(len(counts)), counts)


def _train_shared(source: TrainingSource, table: Path, root: Path, classes: list[tuple[str, int, str]],
                  spec: PersonalizeSpec, done: Path, ident: dict) -> dict[str, object]:
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    pipe = source.pipeline(spec.method, spec.dm_finetune)
    work = done.with_name(done.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "ident.json", ident)
    latents, which = _shared_latents(pipe, table, root, classes, spec, work)
    sched, compute = _frozen_for_training(pipe)
    tokens = [token_for(k) for k, _, _ in classes]
    rows, templates = _pseudo_word_rows(pipe, tokens, [n for _, _, n in classes], compute)
    groups = [{"params": [p], "lr": spec.lr, "weight_decay": 0.0} for p in rows]
    groups.append(_denoiser_group(pipe, spec, item_seed(spec.seed, "lora", spec.method, "shared")))
    g = torch.Generator().manual_seed(item_seed(spec.seed, "personalize", spec.method, "shared"))
    run = _Run(pipe, spec, torch.optim.AdamW(groups), sched, compute, g, f"{spec.method}/{len(classes)} classes")
    denoiser = denoiser_of(pipe)
    ids = [[getattr(pipe, enc.replace("text_encoder", "tokenizer")).convert_tokens_to_ids(t) for t in tokens]
           for enc in pseudo_word_files(pipe)]
    checkpoint, start = work / "checkpoint.pt", 0
    if checkpoint.exists():  # a killed run: the adapter, the rows, the optimiser and the random state as they were
        state = torch.load(checkpoint, weights_only=False)
        with torch.no_grad():
            for row, rid, saved in zip(rows, ids, state["rows"], strict=True):
                row[rid] = saved.to(row)
        if spec.dm_finetune == "lora":
            set_peft_model_state_dict(denoiser, state["denoiser"])
        else:
            denoiser.load_state_dict(state["denoiser"])
        run.opt.load_state_dict(state["opt"])
        if state.get("scaler"):  # fp16 on a GPU: the loss scale as it was (a disabled scaler saves nothing)
            run.scaler.load_state_dict(state["scaler"])
        g.set_state(state["g"])
        start, run.ema = state["step"] + 1, state["ema"]
        log.info("personalize %s: resuming after step %d", spec.method, state["step"])

    def batch() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.randint(0, len(which), (spec.batch_size,), generator=g).numpy()
        z0 = torch.from_numpy(latents[idx]).to(run.device)  # the batch's rows only, read from the map
        picks = torch.randint(0, len(templates), (len(idx),), generator=g)
        prompts = [templates[int(j)].format(tokens[which[i]]) for i, j in zip(idx, picks, strict=True)]
        with _autocast(run.device, compute):
            return z0, encode_prompts(pipe, prompts)

    def save(step: int) -> None:
        if (step + 1) % SHARED_CHECKPOINT_EVERY and step + 1 < spec.shared_steps:
            return
        adapter = get_peft_model_state_dict(denoiser) if spec.dm_finetune == "lora" else denoiser.state_dict()
        state = {"step": step, "ema": run.ema, "g": g.get_state(), "opt": run.opt.state_dict(),
                 "scaler": run.scaler.state_dict(),
                 "rows": [row[rid].detach().cpu().clone() for row, rid in zip(rows, ids, strict=True)],
                 "denoiser": {k: v.detach().cpu().clone() for k, v in adapter.items()}}
        with atomic_path(checkpoint) as tmp_path:
            torch.save(state, tmp_path)

    final = run.train(batch, spec.shared_steps, True, source.gradient_checkpointing, start, save)
    with atomic_dir(done) as tmp:
        save_denoiser(pipe, spec.dm_finetune, tmp / "adapter")  # once; each class's folder links to it
        for (key, _, _), token in zip(classes, tokens, strict=True):
            (tmp / key).mkdir()
            save_pseudo_word(pipe, token, tmp / key)
            link_tree(tmp / "adapter", tmp / key)
            write_json(tmp / key / "personalization.json", {"method": spec.method, "token": token, "shared": True,
                                                           "dm_finetune": spec.dm_finetune, "final_loss": final})
        write_json(tmp / "ident.json", ident)
    source.release(pipe)
    shutil.rmtree(work)
    return {"classes": len(classes), "final_loss": final, "steps": spec.shared_steps, "resumed_at": start}
