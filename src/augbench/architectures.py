"""What a text-to-image architecture is: the one registry of the generators augbench loads through diffusers.

Beside `augbench.methods` (what a *method* is), this table says, per architecture, which diffusers pipeline classes
load it (`model_index.json`'s `_class_name`), its image-to-image pipeline, its text encoders, its denoiser, its
training objective, its sampler and defaults, and how many parameters it holds (the GPU memory it needs). Every
place that treats architectures differently asks this table about a *property*, never a name. Plain data: the
workflow imports it at parse time to refuse a (method, architecture) pair that cannot work before any job runs.

The methods that learn something per class train through `augbench.denoising` (each architecture's latents,
conditioning, objective and denoiser call): conditioning vectors on every architecture, textual inversion where the
pipeline has diffusers' textual-inversion loader (one pseudo-word row per CLIP encoder: SD 1.x / 2.x, SDXL), LoRA on
the denoiser where it has a LoRA loader; a pair that cannot work is refused with its reason (`refusal`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from augbench.methods import Method

Objective = Literal["noise", "flow_matching"]  # epsilon / v prediction (DDPM family) | rectified flow (velocity)
TextEncoder = Literal["clip", "t5", "gemma", "qwen_vl"]


@dataclass(frozen=True)
class Architecture:
    """One text-to-image architecture as diffusers builds it.

    pipelines: `model_index.json` `_class_name`s that are this architecture (the first is its text-to-image class).
    image2image: diffusers' image-to-image pipeline for it (SDEdit at `generate.strength`), None where there is none.
    text_encoders: (pipeline attribute, kind) of each text encoder, in the pipeline's order.
    denoiser: the pipeline attribute of the denoising network (`unet` or `transformer`).
    objective: what the denoiser was trained to predict: noise (epsilon / v) or a flow-matching velocity; the
        samplers of `generate.scheduler` other than `model` are noise-prediction samplers.
    lora: diffusers has a LoRA loader for the pipeline (`load_lora_weights`): per-class LoRA on the denoiser.
    prompt_outputs: what the pipeline's `encode_prompt` returns, by the name its call takes it under (None: an output
        personalisation does not use, e.g. the negative prompt's); ("prompt_embeds",): one CLIP encoder's last hidden
        state, which the personalisation code computes as the pipeline does.
    textual_inversion: the pipeline has diffusers' textual-inversion loader (`load_textual_inversion`); a pseudo-word
        gets a row in each CLIP encoder's token matrix.
    negative_prompt: the pipeline's call takes `negative_prompt` (classifier-free guidance against it).
    call: keyword arguments every call gets (resolution binning off: augbench asks for square images at one side).
    params_b: parameters in billions, all modules (denoiser + text encoders + autoencoder), from the model card of the
        first named checkpoint: the weights' memory is params_b x 2 GB in 16-bit precision.
    denoiser_params_b: the denoiser's parameters in billions (same checkpoint): what one sampling or training step
        computes with.
    text_params_b: the text encoders' parameters in billions (same checkpoint); the autoencoder holds the rest.
    cond_shape: (tokens, width) of the `prompt_embeds` the denoiser is conditioned on: one conditioning vector's size.
    resolution: the side the checkpoint was trained at (its pipeline's default).
    step_tflops: FLOPs (x 1e12) of one denoiser call at `resolution`, batch 1, counted by `benchmarks/step_flops.py`
        on the first checkpoint's configuration built on the meta device (matrix products and attention).
    checkpoints: hub ids of this architecture (for the docs and the example config).
    """

    name: str
    pipelines: tuple[str, ...]
    image2image: str | None
    text_encoders: tuple[tuple[str, TextEncoder], ...]
    denoiser: str
    objective: Objective
    lora: bool
    prompt_outputs: tuple[str | None, ...] = ("prompt_embeds",)
    textual_inversion: bool = False
    negative_prompt: bool = True
    call: tuple[tuple[str, object], ...] = ()
    params_b: float = 0.0
    denoiser_params_b: float = 0.0
    text_params_b: float = 0.0
    cond_shape: tuple[int, int] = (77, 768)
    resolution: int = 1024
    step_tflops: float = 0.0
    checkpoints: tuple[str, ...] = ()

    @property
    def text2image(self) -> str:
        """diffusers' text-to-image pipeline class of the architecture."""
        return self.pipelines[0]

    def weights_gb(self, bytes_per_param: int = 2) -> float:
        """GPU memory of the weights alone (16-bit by default): what inference needs before activations."""
        return round(self.params_b * bytes_per_param, 1)

    def step_cost(self, resolution: int | None = None) -> float:
        """The compute of one denoiser step at `resolution` (default: the architecture's) relative to Stable Diffusion
        v1's at 512 px, the reference the GPU rates of augbench.plan were measured on: counted FLOPs (`step_tflops`),
        scaled by the pixels at another side. A plan from it assumes the GPU runs every denoiser at SD v1's
        utilisation; large transformers usually run at a higher one, so their planned hours are an upper bound."""
        side = resolution or self.resolution
        return self.step_tflops * (side / self.resolution) ** 2 / REFERENCE_STEP[1]


    def param_counts(self) -> dict[str, int]:
        """The counts `augbench.personalize.memory_estimate` reads, from this row's figures: modules, a CLIP token
        matrix (rows x the CLIP encoders' summed width, which is the conditioning width where a pseudo-word can be
        learnt: SD 768, SDXL 768 + 1,280), one conditioning vector's shape, and LoRA
        parameters per unit of rank (Stable Diffusion v1's, scaled by the denoiser's parameters: an estimate)."""
        b = 1e9
        return {"unet": int(self.denoiser_params_b * b), "text_encoder": int(self.text_params_b * b),
                "vae": int((self.params_b - self.denoiser_params_b - self.text_params_b) * b),
                "token_rows": 49_408, "hidden": self.cond_shape[1], "cond_width": self.cond_shape[1],
                "seq": self.cond_shape[0],
                "lora_per_rank": int(199_296 * self.denoiser_params_b / REFERENCE_STEP[0])}


REFERENCE_STEP = (0.86, 0.803)  # Stable Diffusion v1's UNet: parameters (B) and TFLOPs of one call at 512 px


REGISTRY: dict[str, Architecture] = {a.name: a for a in (
    Architecture("sd", ("StableDiffusionPipeline",), "StableDiffusionImg2ImgPipeline", (("text_encoder", "clip"),),
                 "unet", "noise", lora=True, textual_inversion=True, params_b=1.07,
                 denoiser_params_b=0.86, text_params_b=0.123, cond_shape=(77, 768), resolution=512,
                 step_tflops=0.803,
                 checkpoints=("CompVis/stable-diffusion-v1-4", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                              "stabilityai/stable-diffusion-2-1")),
    Architecture("sdxl", ("StableDiffusionXLPipeline",), "StableDiffusionXLImg2ImgPipeline",
                 (("text_encoder", "clip"), ("text_encoder_2", "clip")), "unet", "noise", lora=True, textual_inversion=True,
                 prompt_outputs=("prompt_embeds", None, "pooled_prompt_embeds", None), params_b=3.47,
                 denoiser_params_b=2.57, text_params_b=0.817, cond_shape=(77, 2048), step_tflops=6.76,
                 checkpoints=("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/sdxl-turbo")),
    Architecture("sd3", ("StableDiffusion3Pipeline",), "StableDiffusion3Img2ImgPipeline",
                 (("text_encoder", "clip"), ("text_encoder_2", "clip"), ("text_encoder_3", "t5")), "transformer",
                 "flow_matching", lora=True, prompt_outputs=("prompt_embeds", None, "pooled_prompt_embeds", None), params_b=8.2,
                 denoiser_params_b=2.5, text_params_b=5.57, cond_shape=(333, 4096), step_tflops=11.25,
                 # 3.5 medium; 3.5 large: 13.8 B, its MMDiT 8.1 B
                 checkpoints=("stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large")),
    Architecture("flux", ("FluxPipeline",), "FluxImg2ImgPipeline", (("text_encoder", "clip"), ("text_encoder_2", "t5")),
                 "transformer", "flow_matching", lora=True, negative_prompt=False,
                 prompt_outputs=("prompt_embeds", "pooled_prompt_embeds", None), params_b=16.9,
                 denoiser_params_b=11.9, text_params_b=4.88, cond_shape=(512, 4096), step_tflops=74.38,
                 checkpoints=("black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev")),
    Architecture("sana", ("SanaPipeline",), None, (("text_encoder", "gemma"),), "transformer", "flow_matching",
                 lora=True, prompt_outputs=("prompt_embeds", "prompt_attention_mask", None, None),
                 call=(("use_resolution_binning", False), ("clean_caption", False)), params_b=4.5,
                 denoiser_params_b=1.6, text_params_b=2.6, cond_shape=(300, 2304), step_tflops=2.97,
                 checkpoints=("Efficient-Large-Model/Sana_1600M_1024px_diffusers",)),
    Architecture("pixart_sigma", ("PixArtSigmaPipeline",), None, (("text_encoder", "t5"),), "transformer", "noise",
                 lora=False, prompt_outputs=("prompt_embeds", "prompt_attention_mask", None, None),
                 call=(("use_resolution_binning", False), ("clean_caption", False)), params_b=5.45,
                 denoiser_params_b=0.61, text_params_b=4.76, cond_shape=(300, 4096), step_tflops=6.63,
                 checkpoints=("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",)),
    Architecture("qwen_image", ("QwenImagePipeline",), "QwenImageImg2ImgPipeline", (("text_encoder", "qwen_vl"),),
                 "transformer", "flow_matching", lora=True, prompt_outputs=("prompt_embeds", "prompt_embeds_mask"),
                 params_b=28.8, denoiser_params_b=20.4, text_params_b=8.3, cond_shape=(64, 3584),
                 step_tflops=69.31,
                 checkpoints=("Qwen/Qwen-Image",)),
)}


def architecture(name: str) -> Architecture:
    """The registry row of `name`; an unknown name is an error that lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {list(REGISTRY)}") from None


def of_class_name(class_name: str) -> Architecture:
    """The architecture whose pipelines include `class_name` (a `model_index.json` `_class_name`)."""
    for a in REGISTRY.values():
        if class_name in a.pipelines:
            return a
    known = [p for a in REGISTRY.values() for p in a.pipelines]
    raise ValueError(f"pipeline class {class_name!r} is no architecture augbench knows; known: {known}")


def read_class_name(model: str | Path) -> str | None:
    """`_class_name` of a pipeline folder's `model_index.json`; None for a name that is no folder (a hub id)."""
    index = Path(model) / "model_index.json"
    if not Path(model).is_dir():
        return None
    if not index.is_file():
        raise ValueError(f"{model}: no model_index.json: not a diffusers pipeline folder")
    return str(json.loads(index.read_text())["_class_name"])


def resolve(model: str | Path, declared: str | None) -> Architecture:
    """The architecture of a model: the declared one, checked against the folder's `model_index.json`; or, declared
    `auto` / None, the one the folder names. A mismatch is an error naming the folder, the declared architecture and
    the pipeline class found."""
    found = read_class_name(model)
    if declared in (None, "auto"):
        if found is None:
            raise ValueError(f"{model}: a hub id needs its architecture declared (one of {list(REGISTRY)})")
        return of_class_name(found)
    arch = architecture(declared)
    if found is not None and found not in arch.pipelines:
        raise ValueError(f"{model}: declared architecture {arch.name!r} loads {list(arch.pipelines)}, but its "
                         f"model_index.json names {found!r}")
    return arch


def refusal(m: Method, arch: Architecture, dm_finetune: str = "lora") -> str | None:
    """Why `m` cannot run on `arch` (None: it can), with the denoiser fine-tuned as `personalize.dm_finetune` says.
    Checked at parse time, before any job."""
    if m.family != "generated":
        return None
    if m.from_real and arch.image2image is None:
        return f"diffusers has no image-to-image pipeline for {arch.name} ({arch.text2image})"
    if m.learns == "pseudo_word" and not arch.textual_inversion:
        others = ", ".join(sorted({kind for _, kind in arch.text_encoders if kind != "clip"}))
        return (f"textual inversion learns a row of each CLIP encoder's token matrix; {arch.name} also reads the prompt "
                f"with {others}, which would see the pseudo-word as plain characters; conditioning vectors work on "
                f"{arch.name}")
    if m.finetune_unet and dm_finetune == "lora" and not arch.lora:
        return (f"diffusers has no LoRA loader for {arch.name} ({arch.text2image}); set personalize.dm_finetune: full "
                "to fine-tune its whole denoiser")
    return None


def check_pairs(methods: list[str], arch: Architecture, generator: str = "diffusion", dm_finetune: str = "lora") -> None:
    """Refuse, in one error, every configured method that cannot run on the generator's architecture."""
    from augbench.methods import method

    reasons = [f"{name} on {generator} ({arch.name}): {why}" for name in methods
               if (why := refusal(method(name), arch, dm_finetune)) is not None]
    if reasons:
        raise ValueError("refused before anything runs:\n  " + "\n  ".join(reasons))
