"""Personalisation methods on a tiny Stable Diffusion pipeline the test builds itself (CPU, two steps).

Each method must move exactly what it personalises: the pseudo-word's embedding row, the
conditioning vectors, and (for the *_dm variants) the denoiser, fully or only its LoRA adapters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from augbench.personalize import add_lora, encode_latents, encode_prompt, load_pipeline, train_personalization
from augbench.specs import PersonalizeSpec

CASES = [
    ("textual_inversion", "lora"),
    ("cond_vectors", "lora"),
    ("cond_clusters", "lora"),
    ("textual_inversion_dm", "lora"),
    ("textual_inversion_dm", "full"),
    ("cond_vectors_dm", "lora"),
    ("cond_vectors_dm", "full"),
]


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    """Tensors that differ; a layer wrapped by LoRA keeps its weights under `base_layer`."""
    after = module.state_dict()

    def current(key: str) -> torch.Tensor:
        if key in after:
            return after[key]
        head, _, leaf = key.rpartition(".")
        return after[f"{head}.base_layer.{leaf}"]

    return {k for k, v in before.items() if not torch.equal(v, current(k))}


@pytest.mark.parametrize(("method", "finetune"), CASES)
def test_two_steps_change_only_what_the_method_personalises(tiny_sd: Path, method: str, finetune: str) -> None:
    pipe = load_pipeline(tiny_sd)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    latents = encode_latents(pipe, images)
    assign = np.array([0, 0, 1, 1]) if method == "cond_clusters" else (np.arange(4) if "cond" in method else np.zeros(4, int))
    vae, text, unet = _snapshot(pipe.vae), _snapshot(pipe.text_encoder), _snapshot(pipe.unet)
    n_tokens = len(pipe.tokenizer)
    initial_cond = encode_prompt(pipe, ["a photo of a circle."])
    spec = PersonalizeSpec(method=method, steps=2, batch_size=2, dm_finetune=finetune)

    learned = train_personalization(pipe, latents, assign, "circle", "circle", spec)

    assert _changed(vae, pipe.vae) == set(), "the VAE must stay frozen"
    emb_key = next(k for k in text if k.endswith("token_embedding.weight"))
    weights = pipe.text_encoder.state_dict()
    assert {k for k in text if k != emb_key and not torch.equal(text[k], weights[k])} == set(), "text encoder weights moved"
    if method.startswith("textual_inversion"):
        assert len(pipe.tokenizer) == n_tokens + 1 and learned.token == "<circle>"
        new = weights[emb_key]
        assert torch.equal(new[:n_tokens], text[emb_key]), "only the pseudo-word's row may change"
        tid = pipe.tokenizer.convert_tokens_to_ids("<circle>")
        name_ids = pipe.tokenizer("circle", add_special_tokens=False).input_ids
        assert not torch.allclose(new[tid], text[emb_key][name_ids].mean(0)), "the pseudo-word did not move from its initialisation"
        assert learned.cond is None
    else:
        assert torch.equal(weights[emb_key], text[emb_key]) and len(pipe.tokenizer) == n_tokens
        cond = learned.cond["prompt_embeds"]
        assert cond.shape[0] == int(assign.max()) + 1
        assert not torch.allclose(cond.detach(), initial_cond.expand_as(cond)), "conditioning vectors did not move"
    changed_unet = _changed(unet, pipe.unet)
    lora_keys = {k for k in pipe.unet.state_dict() if "lora" in k}
    if not method.endswith("_dm"):
        assert changed_unet == set() and lora_keys == set(), "the denoiser must stay frozen"
    elif finetune == "full":
        assert lora_keys == set()
        assert len(changed_unet) > 0.9 * len(unet), f"full fine-tuning moved only {len(changed_unet)} of {len(unet)} tensors"
    else:
        assert changed_unet == set(), "LoRA must leave the base UNet weights untouched"
        after = pipe.unet.state_dict()
        lora_b = [k for k in lora_keys if "lora_B" in k]
        assert lora_b and all(after[k].abs().sum() > 0 for k in lora_b), "LoRA B matrices (zero at start) did not move"


def test_lora_adapters_start_as_identity(tiny_sd: Path) -> None:
    """A fresh LoRA must not change the UNet's output (B starts at zero)."""
    pipe = load_pipeline(tiny_sd)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode_prompt(pipe, ["a photo of a circle."])
    with torch.no_grad():
        before = pipe.unet(z, torch.tensor([10]), encoder_hidden_states=cond).sample
        add_lora(pipe.unet, 4, seed=0)
        after = pipe.unet(z, torch.tensor([10]), encoder_hidden_states=cond).sample
    torch.testing.assert_close(before, after)


def test_pseudo_word_plus_lora_is_repeatable_whatever_the_global_rng(tiny_sd: Path) -> None:
    """Same spec, same class: the same LoRA weights, whatever the process's global RNG (peft initialises LoRA A
    from it; before it was seeded, the demo's *_dm rows changed between two runs)."""
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)

    def lora_after(global_seed: int, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        pipe = load_pipeline(tiny_sd)
        spec = PersonalizeSpec(method="textual_inversion_dm", steps=2, batch_size=2, dm_finetune="lora", seed=seed)
        train_personalization(pipe, encode_latents(pipe, images), np.zeros(4, int), "circle", "circle", spec)
        return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items() if "lora" in k}

    first, second, other = lora_after(1, 0), lora_after(2, 0), lora_after(1, 1)
    assert first and first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    lora_a = next(k for k in first if "lora_A" in k)
    assert not torch.equal(first[lora_a], other[lora_a]), "another seed must start elsewhere"


def test_add_lora_leaves_the_callers_rng_where_it_was(tiny_sd: Path) -> None:
    pipe = load_pipeline(tiny_sd)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    add_lora(pipe.unet, 4, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_personalisation_trains_against_the_models_own_objective(tiny_sd: Path, tmp_path: Path, prediction: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """SD v1.4's folder ships a PNDM sampling scheduler and SD 2.x predicts velocity: the loss must follow the model.

    A tiny pipeline saved that way trains one step; the regression target handed to the loss is
    the noise (epsilon) or the velocity of the noised latents (v-prediction).
    """
    from diffusers import DDPMScheduler, PNDMScheduler, StableDiffusionPipeline

    import augbench.personalize as personalize_module
    from augbench.denoising import loss

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.scheduler = PNDMScheduler.from_config({**pipe.scheduler.config, "prediction_type": prediction, "skip_prk_steps": True})
    pipe.save_pretrained(tmp_path / "sd")
    pipe = load_pipeline(tmp_path / "sd")
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"

    seen: dict[str, object] = {}
    add_noise = DDPMScheduler.add_noise

    def recording_add_noise(self, z0, eps, t):  # type: ignore[no-untyped-def]
        seen.update(sched=self, z0=z0, eps=eps, t=t)
        return add_noise(self, z0, eps, t)

    def recording_loss(pred, target, weight):  # type: ignore[no-untyped-def]
        seen["target"] = target
        return loss(pred, target, weight)

    monkeypatch.setattr(DDPMScheduler, "add_noise", recording_add_noise)
    monkeypatch.setattr(personalize_module, "loss", recording_loss)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    spec = PersonalizeSpec(method="textual_inversion_dm", steps=1, batch_size=2)
    learned = train_personalization(pipe, encode_latents(pipe, images), np.zeros(4, int), "circle", "circle", spec)

    assert np.isfinite(learned.final_loss)
    sched, z0, eps, t = seen["sched"], seen["z0"], seen["eps"], seen["t"]
    expected = eps if prediction == "epsilon" else sched.get_velocity(z0, eps, t)  # type: ignore[union-attr]
    assert torch.allclose(seen["target"].float(), expected.float())  # type: ignore[union-attr]
    if prediction == "v_prediction":
        assert not torch.allclose(expected.float(), eps.float())  # type: ignore[union-attr]
