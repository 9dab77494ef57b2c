"""What training a diffusers text-to-image model's denoiser means, per architecture: how its autoencoder turns images
into the latents the denoiser sees, how its text encoders turn prompts into the conditioning its pipeline takes
(`prompt_embeds` with pooled embeddings or attention masks), the noisy input and target of the objective it was trained
with, and how its denoiser class is called.

Personalisation (augbench.personalize) trains through these functions, so one training loop serves every architecture
of `augbench.architectures`. Each piece follows what the model's own pipeline does at sampling time (latent scaling and
shift, packed latents and position ids, SDXL's size conditioning) and what diffusers' training examples do for it
(the DDPM form of the noise schedule; flow matching with logit-normal sigma sampling and the SD3 loss weighting):

- noise objective (SD 1.x / 2.x, SDXL, PixArt-Sigma): x_t = add_noise(x_0, eps, t), target eps or v (the model's
  `prediction_type`); PixArt's denoiser also predicts a variance (learned sigma): only its first half is the noise.
- flow matching (SD3, FLUX.1, Sana, Qwen-Image): sigma drawn logit-normally from the model's shifted schedule,
  x_t = (1 - sigma) x_0 + sigma eps, target eps - x_0, weighted by `compute_loss_weighting_for_sd3`.
"""

from __future__ import annotations

import functools
import inspect

import torch

FLOW_WEIGHTING = "logit_normal"  # diffusers' default weighting scheme in its SD3 / FLUX / Sana LoRA training scripts
DISTILLED_GUIDANCE = 3.5  # the guidance a guidance-distilled denoiser (FLUX.1-dev) trains at: diffusers' FLUX default


def architecture_of(pipe):  # -> augbench.architectures.Architecture
    """The registry row a pipeline was loaded as (`load_pipeline` marks it); Stable Diffusion for a bare pipeline."""
    from augbench.architectures import REGISTRY, of_class_name

    name = getattr(pipe, "augbench_architecture", None)
    return REGISTRY[name] if name else of_class_name(type(pipe).__name__)


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoising network (`unet` or `transformer`)."""
    return getattr(pipe, architecture_of(pipe).denoiser)


@torch.no_grad()
def encode_images(pipe, x: torch.Tensor) -> torch.Tensor:
    """Latents of images `x` (NCHW in [-1, 1]) as the pipeline's denoiser sees them ([n, c, h, w]): the posterior mean,
    shifted and scaled as the pipeline undoes before decoding (SD3 / FLUX shift, Qwen-Image's per-channel mean and
    std, the deep-compression autoencoder's deterministic latent)."""
    vae = pipe.vae
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        # a video autoencoder (Qwen-Image): one frame; per-channel normalisation
        z = vae.encode(x[:, :, None]).latent_dist.mean[:, :, 0].float()
        shape = (1, -1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=z.device).view(shape)
        std = torch.tensor(config.latents_std, device=z.device).view(shape)
        return (z - mean) / std
    encoded = vae.encode(x)
    z = (encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latent).float()
    shift = getattr(config, "shift_factor", None)
    return (z - shift) * config.scaling_factor if shift else z * config.scaling_factor


def encode_prompts(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The conditioning of `prompts` as the pipeline's call takes it (`prompt_embeds`, and `pooled_prompt_embeds`,
    `prompt_attention_mask` or `prompt_embeds_mask` where the architecture has them), through the pipeline's own
    `encode_prompt`; gradients flow (textual inversion trains through it). One CLIP encoder (SD 1.x / 2.x) is called
    directly, as its pipeline does without clip skip."""
    arch = architecture_of(pipe)
    device = pipe.text_encoder.device
    if arch.prompt_outputs == ("prompt_embeds",):
        ids = pipe.tokenizer(prompts, padding="max_length", truncation=True, max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        return {"prompt_embeds": pipe.text_encoder(ids.to(device))[0]}
    takes = _encode_prompt_parameters(type(pipe))
    wanted = {"prompt_2": None, "prompt_3": None, "device": device, "num_images_per_prompt": 1,  # prompt_2/3: prompt
              "do_classifier_free_guidance": False, "clean_caption": False}
    out = pipe.encode_prompt(prompts, **{k: v for k, v in wanted.items() if k in takes})
    # a mask that masks nothing may come back as None (Qwen-Image): left out, as the call takes it
    return {name: value for name, value in zip(arch.prompt_outputs, out, strict=False)
            if name is not None and value is not None}


@functools.cache
def _encode_prompt_parameters(cls: type) -> frozenset[str]:
    """The keyword arguments a pipeline class's `encode_prompt` takes (read once per class: textual inversion encodes
    prompts at every step)."""
    return frozenset(inspect.signature(cls.encode_prompt).parameters)


def trainable_conditioning(name: str) -> bool:
    """Whether a conditioning tensor is learned (embeddings) or carried along (attention masks)."""
    return "mask" not in name


def noised(pipe, scheduler, z0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor | None]:
    """One draw of the objective for clean latents `z0`: (noisy latents, timestep, target, per-sample loss weight or
    None). `scheduler` is `training_scheduler(pipe)`; the draws come from `g` (noise objective: the timestep, then the
    noise)."""
    n, dev = len(z0), z0.device
    if architecture_of(pipe).objective == "noise":
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g)
        eps = torch.randn(z0.shape, generator=g).to(z0)
        zt = scheduler.add_noise(z0, eps, t.to(dev))
        target = eps if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z0, eps, t.to(dev))
        return zt, t.to(dev), target, None
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    u = compute_density_for_timestep_sampling(FLOW_WEIGHTING, n, logit_mean=0.0, logit_std=1.0, generator=g)
    idx = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.sigmas) - 1)
    sigma = scheduler.sigmas[idx].to(dev, torch.float32).view(-1, 1, 1, 1)
    eps = torch.randn(z0.shape, generator=g).to(z0)
    zt = (1 - sigma) * z0 + sigma * eps
    weight = compute_loss_weighting_for_sd3(FLOW_WEIGHTING, sigma)
    return zt, scheduler.timesteps[idx].to(dev), eps - z0, weight


def training_scheduler(pipe):  # -> a diffusers scheduler with add_noise (noise) or its training sigmas (flow)
    """The model's noise schedule in its training form: DDPM for noise models (the saved sampler, PNDM or DPM-Solver,
    need not have add_noise / get_velocity), the flow-matching Euler schedule with the model's shift for flow models
    (a fresh copy: a sampling run changes a scheduler's sigmas)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    config = dict(pipe.scheduler.config)
    if architecture_of(pipe).objective == "noise":
        return DDPMScheduler.from_config(config)
    if "shift" not in config and "flow_shift" in config:  # Sana ships DPM-Solver with flow sigmas and a flow_shift
        config["shift"] = config["flow_shift"]
    config["use_dynamic_shifting"] = False  # training draws sigmas from the static schedule, as diffusers' scripts do
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def predict(pipe, zt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The denoiser's prediction for noisy latents `zt` ([n, c, h, w]) at timesteps `t` (as `noised` returns them)
    under conditioning `cond` (`encode_prompts`' names), in the latents' layout, called as its pipeline calls it."""
    denoiser = denoiser_of(pipe)
    kind = type(denoiser).__name__
    embeds = cond["prompt_embeds"]
    n, c, h, w = zt.shape
    if kind == "UNet2DConditionModel":
        extra = {}
        if getattr(denoiser.config, "addition_embed_type", None) == "text_time":  # SDXL: pooled text and sizes
            side = [h * pipe.vae_scale_factor, w * pipe.vae_scale_factor]
            ids = torch.tensor([[*side, 0, 0, *side]], device=zt.device, dtype=zt.dtype).repeat(n, 1)
            extra["added_cond_kwargs"] = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": ids}
        return denoiser(zt, t, encoder_hidden_states=embeds, **extra).sample
    if kind == "SD3Transformer2DModel":
        return denoiser(hidden_states=zt, timestep=t, encoder_hidden_states=embeds,
                        pooled_projections=cond["pooled_prompt_embeds"]).sample
    if kind == "SanaTransformer2DModel":
        return denoiser(zt, encoder_hidden_states=embeds, encoder_attention_mask=cond["prompt_attention_mask"],
                        timestep=t).sample
    if kind == "PixArtTransformer2DModel":
        out = denoiser(zt, encoder_hidden_states=embeds, encoder_attention_mask=cond["prompt_attention_mask"],
                       timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * c else out  # learned sigma: the noise half
    if kind in ("FluxTransformer2DModel", "QwenImageTransformer2DModel"):  # 2x2 patches packed into tokens
        packed = type(pipe)._pack_latents(zt, n, c, h, w)
        guidance = (torch.full((n,), DISTILLED_GUIDANCE, device=zt.device)
                    if getattr(denoiser.config, "guidance_embeds", False) else None)
        if kind == "FluxTransformer2DModel":
            img_ids = type(pipe)._prepare_latent_image_ids(n, h // 2, w // 2, zt.device, zt.dtype)
            txt_ids = torch.zeros(embeds.shape[1], 3, device=zt.device, dtype=zt.dtype)
            out = denoiser(hidden_states=packed, timestep=t / 1000, guidance=guidance,
                           pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=embeds,
                           txt_ids=txt_ids, img_ids=img_ids).sample
        else:
            out = denoiser(hidden_states=packed, timestep=t / 1000, guidance=guidance, encoder_hidden_states=embeds,
                           encoder_hidden_states_mask=cond.get("prompt_embeds_mask"),
                           img_shapes=[[(1, h // 2, w // 2)]] * n).sample
        return out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)  # unpack
    raise ValueError(f"personalize: no training call for denoiser {kind} ({architecture_of(pipe).name})")


def loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error of the prediction, weighted per sample (flow matching) where a weight is given."""
    if weight is None:
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    return (weight.float() * (pred.float() - target.float()) ** 2).mean()
