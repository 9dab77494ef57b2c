"""A tiny latent diffusion model for the toy world, saved as a diffusers `StableDiffusionPipeline` folder.

Stable Diffusion v1 is a VAE, a text-conditioned UNet and a *frozen* CLIP text encoder, trained
on LAION's images and captions. The toy model has the same parts, trained on the toy pool (noisy
captions included) and the toy CLIP's text tower as its frozen text encoder, so every later stage
(personalisation, generation) loads it with `StableDiffusionPipeline.from_pretrained` exactly as
it loads `CompVis/stable-diffusion-v1-4`.

Why these choices, measured on 2 CPU cores:
- The VAE downsamples 4x (three blocks), not SD's 8x: 32x32 images give 8x8x4 latents. The toy CLIP
  recognises 97 % of real test images; of their reconstructions after 400 VAE steps 53 % at 4x (64 %
  with 16 latent channels), 82 % at 2x; after 800 steps 77 % at 4x. 2x makes every UNet step about
  2.3x dearer, which the CPU budget cannot pay.
- Latents and text states are computed once before UNet training (both encoders are frozen at
  that point), so a UNet step costs only the UNet.
- 10 % of the captions are dropped to "" so that classifier-free guidance has an unconditional model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from augbench.device import pick_device
from augbench.imaging import shift_flip, to_float
from augbench.io import atomic_dir, write_meta
from augbench.specs import DiffusionSpec, spec_dict
from augbench.toy.clip_train import load_pool_arrays

log = logging.getLogger(__name__)


def build_vae(spec: DiffusionSpec):  # -> AutoencoderKL
    """A small convolutional AutoencoderKL; len(widths) - 1 halvings of the image side."""
    from diffusers import AutoencoderKL

    n = len(spec.vae_widths)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=spec.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(spec.vae_widths), layers_per_block=1, norm_num_groups=spec.norm_groups,
        sample_size=spec.image_size, mid_block_add_attention=False,
    )


def build_unet(spec: DiffusionSpec, cross_attention_dim: int):  # -> UNet2DConditionModel
    """A small UNet2DConditionModel; `unet_attention` says which levels (finest first) have cross-attention.

    SD attends at its three finest levels; on a CPU budget attention at the finest level costs the
    most, so the toy default attends at the coarser ones.
    """
    from diffusers import UNet2DConditionModel

    if len(spec.unet_attention) != len(spec.unet_widths):
        raise ValueError(f"diffusion: unet_attention {spec.unet_attention} needs one flag per level of unet_widths {spec.unet_widths}")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.unet_attention))
    return UNet2DConditionModel(
        sample_size=spec.image_size // 2 ** (len(spec.vae_widths) - 1), in_channels=spec.latent_channels,
        out_channels=spec.latent_channels, down_block_types=down, up_block_types=up,
        block_out_channels=tuple(spec.unet_widths), layers_per_block=spec.unet_layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=spec.attention_head_dim, norm_num_groups=spec.norm_groups,
    )


def noise_scheduler(prediction_type: str = "epsilon"):  # -> DDPMScheduler
    """SD v1's training schedule (scaled-linear betas, 1000 steps); epsilon prediction as SD v1, v as SD 2."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, clip_sample=False, prediction_type=prediction_type)


def _cosine(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_vae(images: np.ndarray, spec: DiffusionSpec, device: torch.device):  # -> AutoencoderKL
    """Reconstruction (L1 + MSE) plus a small KL term; returns the VAE with standardised latents."""
    vae = build_vae(spec).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(spec.seed)
    x_all = torch.from_numpy(images)
    started = time.time()
    vae.train()
    for step in range(spec.vae_steps):
        idx = torch.randint(0, len(x_all), (spec.vae_batch_size,), generator=g)
        x = (shift_flip(x_all[idx], g) * 2 - 1).to(device)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=None)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + spec.vae_kl * post.kl().mean()
        for group in opt.param_groups:
            group["lr"] = _cosine(step, spec.vae_steps, spec.vae_lr, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == spec.vae_steps - 1:
            log.info("pretrain_diffusion: vae step %d/%d loss %.4f (%.0fs)", step, spec.vae_steps, loss.item(), time.time() - started)
    vae.eval()
    with torch.no_grad():
        sample = torch.from_numpy(images[: min(len(images), 4096)])
        z = torch.cat([vae.encode((to_float(sample[i:i + 256]) * 2 - 1).to(device)).latent_dist.mean for i in range(0, len(sample), 256)])
    standardise_latents(vae, z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3)))
    return vae


@torch.no_grad()
def standardise_latents(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fold a per-channel shift and scale into the VAE so its latents are zero-mean, unit-variance.

    SD's single `scaling_factor` only rescales; the StableDiffusionPipeline has no shift. A latent
    channel with a large mean shows up as a colour cast in samples from a briefly trained UNet, so
    the encoder's `quant_conv` is changed to emit (mean - mu) / s (and log-variance - 2 log s) and
    the decoder's `post_quant_conv` to take it back: decode(encode(x)) is unchanged, `scaling_factor` is 1.
    """
    lc = len(mean)
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:lc] /= std.view(-1, 1, 1, 1)
    q.bias[:lc] = (q.bias[:lc] - mean) / std
    q.bias[lc:] -= 2 * torch.log(std)
    p.bias += (p.weight[:, :, 0, 0] @ mean)
    p.weight *= std.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0)


@torch.no_grad()
def encode_images(vae, images: np.ndarray, device: torch.device, batch: int = 256) -> torch.Tensor:
    """Scaled posterior means of uint8 NHWC images (the frozen-encoder cache for UNet training)."""
    out = []
    for i in range(0, len(images), batch):
        x = to_float(torch.from_numpy(images[i:i + batch])) * 2 - 1
        out.append(vae.encode(x.to(device)).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out).cpu()


@torch.no_grad()
def encode_texts(text_encoder, tokenizer, texts: list[str], device: torch.device, batch: int = 512) -> torch.Tensor:
    """Per-token hidden states of the frozen text encoder: the UNet's conditioning sequence."""
    out = []
    for i in range(0, len(texts), batch):
        ids = tokenizer(texts[i:i + batch], padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        out.append(text_encoder(ids.to(device))[0].cpu())
    return torch.cat(out)


def denoising_loss(pred: torch.Tensor, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, sched, gamma: float) -> torch.Tensor:
    """MSE against the scheduler's own target (noise or velocity), min-SNR-gamma weighted (Hang et al. 2023).

    The weighting stops the easy low-noise steps from dominating; for v-prediction the same weighting
    of the x0 error is min(snr, gamma) / (snr + 1). v-prediction is the toy default: with the same
    UNet, data and 1,500 steps it gave 0.19-0.20 fidelity where epsilon gave 0.14-0.16 (README).
    """
    a = sched.alphas_cumprod.to(t.device)[t]
    snr = a / (1 - a)
    if sched.config.prediction_type == "epsilon":
        target, weight = eps, snr.clamp(max=gamma) / snr
    elif sched.config.prediction_type == "v_prediction":
        target, weight = sched.get_velocity(z0, eps, t), snr.clamp(max=gamma) / (snr + 1)
    else:
        raise ValueError(f"diffusion: prediction_type {sched.config.prediction_type!r} is not epsilon or v_prediction")
    return (weight * F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))).mean()


class AlignHead(torch.nn.Module):
    """REPA's projection (training only, never saved): UNet mid-block features -> the CLIP image tower's width."""

    def __init__(self, cin: int, cout: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(cin, hidden, 1), torch.nn.SiLU(), torch.nn.Conv2d(hidden, cout, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def train_unet(latents: torch.Tensor, states: torch.Tensor, empty: torch.Tensor, spec: DiffusionSpec, device: torch.device,
               mirrored: torch.Tensor | None = None, features: tuple[torch.Tensor, torch.Tensor] | None = None,
               evaluate: Callable[[object, int], dict[str, object]] | None = None):
    """Denoiser training on cached latents and text states, with caption dropout for guidance.

    `mirrored`: latents of the horizontally mirrored images. The pool has no orientation, so a mirror is a free
    sample, but the VAE is not flip-equivariant (flipped latents decode to off-manifold images): half of each batch
    takes the mirrored image's own latent. `features`: the CLIP image tower's feature maps of the clean images and
    of their mirrors; with `spec.repa_weight` > 0 the UNet's mid-block features of the noisy latent are aligned with
    them by cosine through a small head (REPA, Yu et al. 2024): a direct shape signal where the denoising loss gives
    the conditioning almost none. `evaluate(ema_unet, step)` is called every `spec.eval_every` steps (learning curve).
    """
    import copy

    unet = build_unet(spec, states.shape[-1]).to(device)
    ema_unet = copy.deepcopy(unet).requires_grad_(False) if spec.ema_decay > 0 else unet
    sched = noise_scheduler(spec.prediction_type)
    head, mid = None, {}
    if spec.repa_weight > 0 and features is not None:
        head = AlignHead(spec.unet_widths[-1], features[0].shape[1]).to(device)
        unet.mid_block.register_forward_hook(lambda module, args, out: mid.__setitem__("h", out))
    params = list(unet.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.AdamW(params, lr=spec.unet_lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(spec.seed + 1)
    ema = align_ema = None
    curve: list[dict[str, object]] = []
    started = time.time()
    unet.train()
    for step in range(spec.unet_steps):
        idx = torch.randint(0, len(latents), (spec.unet_batch_size,), generator=g)
        flip = torch.rand(len(idx), generator=g) < 0.5
        z0 = latents[idx] if mirrored is None else torch.where(flip[:, None, None, None], mirrored[idx], latents[idx])
        cond = states[idx].clone()
        drop = torch.rand(len(idx), generator=g) < spec.caption_dropout
        cond[drop] = empty
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        zt = sched.add_noise(z0, eps, t)
        z0, eps, t = z0.to(device), eps.to(device), t.to(device)
        pred = unet(zt.to(device), t, encoder_hidden_states=cond.to(device)).sample
        loss = denoising_loss(pred, z0, eps, t, sched, spec.min_snr_gamma)
        if head is not None:
            target = torch.where(flip[:, None, None, None], features[1][idx], features[0][idx]).float().to(device)
            h = head(mid["h"])
            if h.shape[-2:] != target.shape[-2:]:
                h = F.adaptive_avg_pool2d(h, target.shape[-2:])
            align = 1 - F.cosine_similarity(h, target, dim=1).mean()
            loss = loss + spec.repa_weight * align
            align_ema = align.item() if align_ema is None else 0.98 * align_ema + 0.02 * align.item()
        for group in opt.param_groups:
            group["lr"] = _cosine(step, spec.unet_steps, spec.unet_lr, 100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema_unet is not unet:  # an exponential moving average of the weights samples better after short training
            decay = min(spec.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema_unet.parameters(), unet.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == spec.unet_steps - 1:
            log.info("pretrain_diffusion: unet step %d/%d loss %.4f%s (%.0fs)", step, spec.unet_steps, ema,
                     "" if align_ema is None else f" align {align_ema:.4f}", time.time() - started)
        if evaluate is not None and spec.eval_every and ((step + 1) % spec.eval_every == 0 or step + 1 == spec.unet_steps):
            ema_unet.eval()
            point = {"step": step + 1, "seconds": round(time.time() - started), **evaluate(ema_unet, step + 1)}
            curve.append(point)
            log.info("pretrain_diffusion: fidelity at step %d: %.3f", step + 1, point["fidelity"])
            if ema_unet is unet:
                unet.train()
    ema_unet.eval()
    return ema_unet, float(ema or 0.0), curve


def load_text_tower(clip_model: str | Path):  # -> (CLIPTextModel, CLIPTokenizer)
    """The CLIP's own text encoder and tokenizer, frozen, as SD v1 uses CLIP ViT-L/14's."""
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel

    import augbench.toy.clip  # noqa: F401  (registers the toy CLIP with AutoModel)

    clip = AutoModel.from_pretrained(clip_model)
    tokenizer = AutoTokenizer.from_pretrained(clip_model)
    text = clip.text_model
    encoder = text if isinstance(text, CLIPTextModel) else CLIPTextModel(clip.config.text_config)
    if encoder is not text:
        encoder.text_model.load_state_dict(text.state_dict())
    tokenizer.model_max_length = encoder.config.max_position_embeddings
    return encoder.eval().requires_grad_(False), tokenizer


@torch.no_grad()
def clip_feature_maps(clip_model: str | Path, images: np.ndarray, batch: int = 512) -> torch.Tensor | None:
    """The CLIP image tower's spatial feature map of each image (fp16 [n, c, h, w]): REPA's target.

    None when the tower has no spatial map (a ViT's tokens); the toy CLIP's CNN gives 4x4 at 32 px.
    """
    from PIL import Image

    from augbench.embed import Clip

    clip = Clip(clip_model, device=torch.device("cpu"))
    out = []
    for i in range(0, len(images), batch):
        pix = clip.processor(images=[Image.fromarray(a) for a in images[i:i + batch]], return_tensors="pt")["pixel_values"]
        h = clip.model.vision_model(pix).last_hidden_state
        if h.ndim != 4:
            log.info("pretrain_diffusion: the CLIP image tower has no spatial feature map; no alignment loss")
            return None
        out.append(h.half())
    return torch.cat(out)


def fidelity_probe(vae, text_encoder, tokenizer, clip_model: str | Path, names: list[str], spec: DiffusionSpec,
                   steps: int = 12, guidance: float = 5.0) -> Callable[[object, int], dict[str, object]]:
    """A callback measuring generation fidelity as `collect` does: `eval_per_class` images per class from "a photo of
    a {name}.", DPM-Solver, the CLIP's zero-shot label; the images' seeds are fixed, so points of the curve compare."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from augbench.embed import Clip

    clip = Clip(clip_model, device=torch.device("cpu"))
    prompts = [f"a photo of a {n}." for n in names for _ in range(spec.eval_per_class)]
    labels = np.repeat(np.arange(len(names)), spec.eval_per_class)

    def evaluate(unet, step: int) -> dict[str, object]:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=noise_scheduler(spec.prediction_type), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        images = []
        for i in range(0, len(prompts), 50):
            gens = [torch.Generator().manual_seed(10_000 + j) for j in range(i, min(i + 50, len(prompts)))]
            images += pipe(prompt=prompts[i:i + 50], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                           height=spec.image_size, width=spec.image_size).images
        pred = clip.zero_shot(images, names)
        return {"fidelity": float((pred == labels).mean()),
                "per_class": {n: float((pred[labels == c] == c).mean()) for c, n in enumerate(names)}}

    return evaluate


def pretrain_diffusion(shards: list[Path], clip_model: str | Path, out: Path, spec: DiffusionSpec,
                       names: list[str] | None = None) -> dict[str, object]:
    """Train the VAE, then the UNet, on the pool; save a StableDiffusionPipeline folder at `out`.

    With `spec.eval_every` and the class `names`, generation fidelity is measured along the way: the learning
    curve, recorded in the model's `.meta.json`.
    """
    from diffusers import StableDiffusionPipeline

    started = time.time()
    torch.manual_seed(spec.seed)
    device = pick_device()
    images, captions = load_pool_arrays(shards)
    log.info("pretrain_diffusion: %d pool images, device %s, spec %s", len(images), device, spec)
    text_encoder, tokenizer = load_text_tower(clip_model)
    vae = train_vae(images, spec, device)
    latents = encode_images(vae, images, device)
    mirrored_images = np.ascontiguousarray(images[:, :, ::-1])
    mirrored = encode_images(vae, mirrored_images, device)
    states = encode_texts(text_encoder.to(device), tokenizer, captions, device)
    empty = encode_texts(text_encoder, tokenizer, [""], device)[0]
    with torch.no_grad():
        rec = vae.decode(latents[:256].to(device) / vae.config.scaling_factor).sample.clamp(-1, 1)
        target = to_float(torch.from_numpy(images[:256])) * 2 - 1
        psnr = float(10 * torch.log10(4 / F.mse_loss(rec.cpu(), target)))
    log.info("pretrain_diffusion: vae reconstruction PSNR %.1f dB, scaling factor %.3f", psnr, vae.config.scaling_factor)
    features = None
    if spec.repa_weight > 0:
        maps = clip_feature_maps(clip_model, images)
        features = None if maps is None else (maps, clip_feature_maps(clip_model, mirrored_images))
    del mirrored_images
    probe = None
    if spec.eval_every and names:
        probe = fidelity_probe(vae.eval(), text_encoder.cpu(), tokenizer, clip_model, names, spec)
    unet, loss, curve = train_unet(latents, states, empty, spec, device, mirrored=mirrored, features=features, evaluate=probe)
    pipe = StableDiffusionPipeline(vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet.cpu(),
                                   scheduler=noise_scheduler(spec.prediction_type), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp)
    stats = {"vae_psnr": psnr, "unet_loss": loss, "n_images": len(images), "seconds": time.time() - started,
             "learning_curve": curve}
    write_meta(out, "pretrain_diffusion", spec_dict(spec), started, stats=stats)
    return stats
