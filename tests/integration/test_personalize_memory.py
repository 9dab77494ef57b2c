"""Personalisation's memory discipline (what a GPU process holds), checked on the CPU with a half compute dtype.

A personalisation process holds the loaded pipeline once in host memory (fp32) and each frozen module once on the
device in one compute dtype (bf16 here, as on a GPU that has it); only what a method trains is fp32 and its class's
own. 20 steps of each method kind must keep the loss finite, move only the trainable tensors, and save a result that
loads back into an fp32 pipeline and changes what it computes. LoRA adapters are added to the shared UNet for one class
and removed after it: the next class must come out as in a process of its own.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from augbench.generate import apply_personalization, conditioning
from augbench.personalize import (
    TrainingSource,
    encode_latents,
    encode_prompt,
    load_pipeline,
    personalize_block,
    save_personalization,
    train_personalization,
)
from augbench.specs import PersonalizeSpec

HALF = torch.bfloat16
KINDS = [("textual_inversion", "lora"), ("cond_vectors", "lora"), ("textual_inversion_dm", "lora"),
         ("cond_vectors_dm", "full")]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a module (a LoRA-wrapped layer's frozen weight under its original name)."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items() if "lora_" not in k}


def _dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


@pytest.mark.parametrize(("method", "finetune"), KINDS)
def test_frozen_once_in_the_compute_dtype_trainable_in_fp32(tiny_sd: Path, tmp_path: Path, method: str,
                                                            finetune: str) -> None:
    source = TrainingSource(tiny_sd, torch.device("cpu"), HALF)
    pipe = source.pipeline(method, finetune)
    host = source.host()
    # the loaded pipeline stays fp32 in host memory; what runs is a half-precision copy, shared where frozen
    assert all(_dtypes(getattr(host, n)) == {torch.float32} for n in ("vae", "unet", "text_encoder"))
    assert pipe.vae is source.frozen("vae") is not host.vae and _dtypes(pipe.vae) == {HALF}
    if finetune == "full":
        assert pipe.unet is not source.frozen("unet") and _dtypes(pipe.unet) == {torch.float32}
    else:
        assert pipe.unet is source.frozen("unet") and _dtypes(pipe.unet) == {HALF}
    if method.startswith("textual_inversion"):  # the class's own copy, on the device in the compute dtype
        assert pipe.text_encoder is not host.text_encoder and pipe.tokenizer is not host.tokenizer
        assert _dtypes(pipe.text_encoder) == {HALF}
    else:  # one prompt per class, encoded on the host: the text encoder never reaches the device
        assert pipe.text_encoder is host.text_encoder and _dtypes(pipe.text_encoder) == {torch.float32}
    frozen = {"vae": _state(pipe.vae), "text_encoder": _state(pipe.text_encoder), "unet": _state(pipe.unet)}
    host_before = _state(host.unet)

    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    latents = encode_latents(pipe, images)
    assign = np.arange(4) if "cond" in method else np.zeros(4, dtype=np.int64)
    spec = PersonalizeSpec(method=method, steps=20, batch_size=2, dm_finetune=finetune)
    initial_cond = encode_prompt(pipe, ["a photo of a circle."]).float()  # where conditioning vectors start
    learned = train_personalization(pipe, latents, assign, "circle", "circle", spec)

    assert math.isfinite(learned.final_loss)  # an EMA over all 20 steps: one inf or nan step would stay in it
    trained = {n: [p for p in getattr(pipe, n).parameters() if p.dtype == torch.float32] for n in ("text_encoder", "unet")}
    if learned.cond is not None:
        assert learned.cond["prompt_embeds"].dtype == torch.float32
    after = {"vae": _state(pipe.vae), "text_encoder": _state(pipe.text_encoder), "unet": _state(pipe.unet)}
    assert all(torch.equal(v, after["vae"][k]) for k, v in frozen["vae"].items()), "the VAE must not move"
    emb_key = next(k for k in after["text_encoder"] if k.endswith("token_embedding.weight"))
    moved_text = {k for k, v in frozen["text_encoder"].items() if not torch.equal(v, after["text_encoder"][k][:len(v)])}
    if method.startswith("textual_inversion"):
        # the pseudo-word's row trains in fp32; every other row and every other tensor of the encoder stays as it was
        emb = pipe.text_encoder.get_input_embeddings().weight
        assert emb.dtype == torch.float32 and len(trained["text_encoder"]) == 1 and trained["text_encoder"][0] is emb
        assert moved_text == set() and len(after["text_encoder"][emb_key]) == len(frozen["text_encoder"][emb_key]) + 1
    else:  # the host's fp32 encoder, frozen: nothing of it trains
        assert moved_text == set() and not any(p.requires_grad for p in pipe.text_encoder.parameters())
    moved_unet = {k for k, v in frozen["unet"].items() if not torch.equal(v, after["unet"][k])}
    if finetune == "full":
        assert moved_unet  # the class's own fp32 copy trained
    else:
        assert moved_unet == set(), "the shared UNet's frozen weights must not move"
    if method.endswith("_dm") and finetune == "lora":
        lora = [n for n, p in pipe.unet.named_parameters() if "lora_" in n]
        assert lora and all(p.dtype == torch.float32 for n, p in pipe.unet.named_parameters() if "lora_" in n)
    assert all(torch.equal(v, _state(host.unet)[k]) for k, v in host_before.items()), "the loaded pipeline is pristine"

    out = tmp_path / "saved"
    save_personalization(pipe, learned, method, spec, out)
    source.release(pipe)
    assert not getattr(source.frozen("unet"), "peft_config", None), "a class's adapters leave the shared UNet"

    # loaded back into a plain fp32 pipeline, the result changes what that pipeline computes
    plain = load_pipeline(tiny_sd)
    before_unet = _sample(plain, encode_prompt(plain, ["a photo of a circle."]))
    apply_personalization(plain, out)
    if learned.token is not None:
        row = plain.text_encoder.get_input_embeddings().weight[plain.tokenizer.convert_tokens_to_ids(learned.token)]
        torch.testing.assert_close(row, pipe.text_encoder.get_input_embeddings().weight[-1].detach(), rtol=0, atol=0)
        word = plain.tokenizer(["circle"], add_special_tokens=False).input_ids[0]
        initial = plain.text_encoder.get_input_embeddings().weight[word].mean(0)
        assert not torch.equal(row, initial), "the pseudo-word must have moved from its initialisation"
    if learned.cond is not None:
        cond = conditioning(out)["prompt_embeds"]
        assert cond.dtype == torch.float32 and not torch.equal(cond[0], initial_cond[0])
        assert not torch.allclose(_sample(plain, cond[:1]), _sample(plain, initial_cond))
    if method.endswith("_dm"):
        assert not torch.allclose(_sample(plain, encode_prompt(plain, ["a photo of a circle."])), before_unet)


@torch.no_grad()
def _sample(pipe, cond: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction for one fixed noisy latent under `cond`."""
    g = torch.Generator().manual_seed(0)
    side = pipe.unet.config.sample_size
    z = torch.randn(1, pipe.unet.config.in_channels, side, side, generator=g)
    return pipe.unet(z, torch.tensor([500]), encoder_hidden_states=cond.float()).sample


def test_a_class_after_another_on_the_shared_unet_is_as_in_its_own_process(tiny_sd: Path, target: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    table, root = target
    spec = PersonalizeSpec(method="cond_vectors_dm", steps=3, batch_size=2, dm_finetune="lora")
    both = [("circle", 0, "circle"), ("square", 1, "square")]
    personalize_block(tiny_sd, table, root, both, tmp_path / "both", tmp_path / "cache_both", spec)
    personalize_block(tiny_sd, table, root, both[1:], tmp_path / "alone", tmp_path / "cache_alone", spec)
    weights = "pytorch_lora_weights.safetensors"
    assert (tmp_path / "both/square" / weights).read_bytes() == (tmp_path / "alone/square" / weights).read_bytes()
    assert (tmp_path / "both/circle" / weights).read_bytes() != (tmp_path / "both/square" / weights).read_bytes()
