"""Class-block workers: one process, one model load, and for every class the result a process of its own gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from augbench.generate import generate_block
from augbench.personalize import PipelineSource, encode_latents, load_pipeline, personalize_block
from augbench.shards import pointed_images
from augbench.specs import GenerateSpec, PersonalizeSpec

CLASSES = [("circle", 0, "circle"), ("square", 1, "square")]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _images(folder: Path) -> dict[str, bytes]:
    return pointed_images(folder / "manifest.parquet")


@pytest.mark.parametrize(("method", "finetune"), [("textual_inversion_dm", "lora"), ("cond_vectors_dm", "full"),
                                                   ("textual_inversion", "lora")])
def test_a_block_gives_each_class_what_its_own_process_gives(tiny_sd: Path, target: tuple[Path, Path], tmp_path: Path,
                                                             method: str, finetune: str) -> None:
    pspec = PersonalizeSpec(method=method, steps=3, batch_size=2, dm_finetune=finetune)
    gspec = GenerateSpec(method=method, n_images=3, steps=2, batch_size=2, guidance_scale=2.0)
    table, root = target
    stats = personalize_block(tiny_sd, table, root, CLASSES, tmp_path / "p/block", tmp_path / "p/cache", pspec)
    assert stats["pipeline_loads"] == 1 and stats["classes"] == 2
    gen = generate_block(tiny_sd, CLASSES, tmp_path / "g/block", tmp_path / "g/cache", gspec, tmp_path / "p/block",
                         (table, root))
    assert gen["pipeline_loads"] == 1 and gen["images"] == 6
    for key, label, name in CLASSES:  # each class alone, as a one-class block (a process of its own)
        alone = tmp_path / f"alone_{key}"
        personalize_block(tiny_sd, table, root, [(key, label, name)], alone / "p/block", alone / "p/cache", pspec)
        generate_block(tiny_sd, [(key, label, name)], alone / "g/block", alone / "g/cache", gspec, alone / "p/block",
                       (table, root))
        learned = {k: v for k, v in _files(tmp_path / "p/block" / key).items() if k != "ident.json"}
        assert learned == {k: v for k, v in _files(alone / "p/block" / key).items() if k != "ident.json"}
        assert _images(tmp_path / "g/block" / key) == _images(alone / "g/block" / key)


def test_a_killed_block_keeps_the_classes_it_finished(tiny_sd: Path, target: tuple[Path, Path], tmp_path: Path) -> None:
    pspec = PersonalizeSpec(method="textual_inversion", steps=2, batch_size=2)
    table, root = target
    personalize_block(tiny_sd, table, root, CLASSES[:1], tmp_path / "first", tmp_path / "cache", pspec)
    stats = json.loads((tmp_path / "first.meta.json").read_text())["stats"]
    assert stats["per_class"]["circle"].get("cached") is None
    # the rerun of the whole block (as after a kill) takes the finished class from the cache and makes the other
    personalize_block(tiny_sd, table, root, CLASSES, tmp_path / "block", tmp_path / "cache", pspec)
    stats = json.loads((tmp_path / "block.meta.json").read_text())["stats"]
    assert stats["per_class"]["circle"] == {"cached": True} and "final_loss" in stats["per_class"]["square"]
    assert _files(tmp_path / "block/circle") == _files(tmp_path / "first/circle")


def test_the_vae_never_sees_more_than_the_micro_batch(tiny_sd: Path) -> None:
    pipe = load_pipeline(tiny_sd)
    images = np.random.default_rng(0).integers(0, 256, (260, 16, 16, 3), dtype=np.uint8)
    whole = encode_latents(pipe, images, micro_batch=10**6)
    seen: list[int] = []
    encode = pipe.vae.encode
    pipe.vae.encode = lambda x, *a, **k: (seen.append(len(x)), encode(x, *a, **k))[1]
    parts = encode_latents(pipe, images, micro_batch=16)
    assert max(seen) == 16 and sum(seen) == 2 * 260  # the images and their mirrors, 16 at a time
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[260:261], encode_latents(pipe, images[:1, :, ::-1].copy(), 1)[:1])  # mirror of image 0


@pytest.mark.parametrize(("method", "finetune"), [("textual_inversion_dm", "lora"), ("cond_vectors_dm", "full")])
def test_a_class_personalisation_goes_into_the_shared_pipeline_and_out_again(
        tiny_sd: Path, target: tuple[Path, Path], tmp_path: Path, method: str, finetune: str) -> None:
    """No per-class copy of the UNet or text encoder: the class's pseudo-word and LoRA (or fine-tuned UNet) are loaded
    into the one pipeline while it generates, and afterwards its modules, weights and vocabulary are as loaded."""
    from augbench.generate import personalisation_loaded

    table, root = target
    personalize_block(tiny_sd, table, root, CLASSES[:1], tmp_path / "p", tmp_path / "pc",
                      PersonalizeSpec(method=method, steps=2, batch_size=2, dm_finetune=finetune))
    pipe = PipelineSource(tiny_sd).base()
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    before = {k: v.clone() for k, v in {**unet.state_dict(), **text_encoder.state_dict()}.items()}
    vocab = dict(tokenizer.get_vocab())
    with personalisation_loaded(pipe, tmp_path / "p/circle") as info:
        assert (info.get("token") in pipe.tokenizer.get_vocab()) == (method == "textual_inversion_dm")
        assert pipe.text_encoder is text_encoder
        assert (pipe.unet is unet) == (finetune == "lora"), "LoRA goes into the shared UNet; a full fine-tune swaps"
        if finetune == "lora":
            assert getattr(pipe.unet, "peft_config", None)
    assert pipe.unet is unet and pipe.tokenizer is tokenizer and pipe.text_encoder is text_encoder
    assert not getattr(unet, "peft_config", None) and dict(tokenizer.get_vocab()) == vocab
    after = {**unet.state_dict(), **text_encoder.state_dict()}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
