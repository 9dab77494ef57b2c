"""The figures `augbench plan` computes from: Stable Diffusion v1's parameter counts, the runtime formulas' shape."""

from __future__ import annotations

import torch

from augbench.personalize import SD1_PARAMS, memory_estimate, param_counts, per_gpu
from augbench.plan import RATES, generate_minutes, personalize_minutes, train_minutes
from augbench.specs import PersonalizeSpec


def test_sd1_parameter_counts_are_the_real_classes_counts() -> None:
    """Recounted from diffusers' and transformers' own classes at SD v1's configs, built on the meta device (no memory)."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
    pipe = SimpleNamespace(unet=unet, text_encoder=text, vae=vae, tokenizer=SimpleNamespace(model_max_length=77))
    assert param_counts(pipe) == SD1_PARAMS


def test_memory_estimate_holds_frozen_weights_once_and_trains_in_fp32() -> None:
    ti = memory_estimate(SD1_PARAMS, "textual_inversion", PersonalizeSpec(method="textual_inversion", batch_size=4))
    lora = memory_estimate(SD1_PARAMS, "textual_inversion_dm", PersonalizeSpec(method="textual_inversion_dm"))
    full = memory_estimate(SD1_PARAMS, "textual_inversion_dm", PersonalizeSpec(method="textual_inversion_dm",
                                                                                dm_finetune="full"))
    frozen_all = (SD1_PARAMS["unet"] + SD1_PARAMS["text_encoder"] + SD1_PARAMS["vae"]) * 2 / 2**20
    assert abs(ti["frozen_mb"] - (frozen_all - SD1_PARAMS["token_rows"] * 768 * 2 / 2**20)) < 1  # bf16, once
    assert abs(full["trainable_mb"] - (SD1_PARAMS["unet"] + 49409 * 768) * 16 / 2**20) < 1  # fp32 + grad + AdamW
    assert lora["trainable_mb"] < ti["trainable_mb"] + 60 < full["trainable_mb"]
    assert per_gpu(81920, full["total_mb"]) < per_gpu(81920, lora["total_mb"])


def test_runtimes_grow_with_the_work_and_the_share_of_the_gpu() -> None:
    config = {"personalize": {"batch_size": 4, "steps": 1000, "dm_finetune": "lora"}, "gpu_share": 1,
              "generate": {"steps": 25, "strength": 0.5}, "train": {"epochs": 90, "batch_size": 256, "min_steps": 0}}
    one = personalize_minutes(config, "textual_inversion", 25)
    assert one == int(15 + 1.5 * 25 * 1000 / RATES["personalize_pseudo_word"].value / 60)
    assert personalize_minutes(config | {"gpu_share": 4}, "textual_inversion", 25) > 3.9 * (one - 15)
    assert personalize_minutes(config, "textual_inversion_dm", 25) > one  # LoRA's measured rate is lower
    assert generate_minutes(config, "img2img", 25, 512) < generate_minutes(config, "prompt_classname", 25, 512)
    assert train_minutes(config, 640_000) > 2 * train_minutes(config, 256_000) - 15


def test_flux_lora_personalisation_fits_a_40_gb_card_with_gradient_checkpointing() -> None:
    """The memory estimate per architecture (Architecture.param_counts, step cost, CHECKPOINTED_SHARE): FLUX.1's LoRA
    with one conditioning vector per image at 512 px, batch 1, fits a 40 GB card only with gradient checkpointing and
    with its text encoders left on the host; SD 1.5's packs many processes on one 80 GB card."""
    from augbench.architectures import architecture
    from augbench.personalize import SD1_PARAMS, memory_estimate, per_gpu

    flux = architecture("flux")
    spec = PersonalizeSpec(method="cond_vectors_dm", batch_size=1, resolution=512)

    def total(checkpointing: bool) -> float:
        return memory_estimate(flux.param_counts(), "cond_vectors_dm", spec, vectors=130, resolution=1024,
                               step_cost=flux.step_cost(512), gradient_checkpointing=checkpointing)["total_mb"]

    assert per_gpu(40 * 1024, total(True)) == 1 and per_gpu(40 * 1024, total(False)) == 0
    on_device = total(True) + flux.param_counts()["text_encoder"] * 2 / 2**20  # T5 and CLIP on the card as well
    assert per_gpu(40 * 1024, on_device) == 0
    sd = memory_estimate(SD1_PARAMS, "cond_vectors_dm", PersonalizeSpec(method="cond_vectors_dm"), vectors=130)
    assert per_gpu(80 * 1024, sd["total_mb"]) >= 8
