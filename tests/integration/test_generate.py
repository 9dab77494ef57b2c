"""Generation on a tiny Stable Diffusion pipeline: textual-inversion files load with diffusers, seeds fix pixels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from augbench.generate import generate
from augbench.personalize import load_pipeline, personalize_block
from augbench.shards import pointed_images
from augbench.specs import GenerateSpec, PersonalizeSpec


def _images(folder: Path) -> dict[str, bytes]:
    return pointed_images(folder / "manifest.parquet")


def test_textual_inversion_file_loads_into_a_fresh_pipeline(tiny_sd: Path, target: tuple[Path, Path], tmp_path: Path) -> None:
    personalize_block(tiny_sd, target[0], target[1], [("circle", 0, "circle")], tmp_path / "block", tmp_path / "cache",
                      PersonalizeSpec(method="textual_inversion", steps=2))
    out = tmp_path / "block/circle"
    saved = load_file(str(out / "learned_embeds.safetensors"))
    assert list(saved) == ["<circle>"] and saved["<circle>"].shape == (1, 32)

    pipe = load_pipeline(tiny_sd)
    assert "<circle>" not in pipe.tokenizer.get_vocab()
    pipe.load_textual_inversion(str(out), weight_name="learned_embeds.safetensors", token="<circle>")
    tid = pipe.tokenizer.convert_tokens_to_ids("<circle>")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[tid], saved["<circle>"][0])

    def sample(prompt: str) -> np.ndarray:
        image = pipe(prompt, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (16, 16)
        return np.asarray(image)

    assert not np.array_equal(sample("a photo of a <circle>."), sample("a photo of a circle.")), "the pseudo-word had no effect"


@pytest.mark.parametrize("method", ["prompt_templates", "img2img"])
def test_same_seed_same_bytes_and_more_images_append(tiny_sd: Path, target: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    spec = GenerateSpec(method=method, n_images=4, batch_size=2, steps=3, guidance_scale=2.0, strength=0.6)

    def run(name: str, cache: str, n: int) -> dict[str, object]:
        return generate(tiny_sd, "circle", "circle", 0, tmp_path / name, tmp_path / cache,
                        GenerateSpec(**{**spec.__dict__, "n_images": n}), real=target)

    run("a", "cache_a", 4)
    run("b", "cache_b", 4)
    a, b = _images(tmp_path / "a"), _images(tmp_path / "b")
    assert len(a) == 4 and a == b, "the same seeds must give byte-identical images"
    assert len(set(a.values())) == 4, "each image has its own seed"

    stats = run("more", "cache_a", 7)
    more = _images(tmp_path / "more")
    assert stats["chunks_reused"] == 2 and stats["chunks_made"] == 2
    assert len(more) == 7 and {k: more[k] for k in a} == a, "asking for more images changed existing ones"
    fresh = run("fresh", "cache_c", 7)
    assert fresh["chunks_reused"] == 0 and _images(tmp_path / "fresh") == more, "a cold cache must give the same bytes"
    manifest = pd.read_parquet(tmp_path / "more/manifest.parquet")
    assert list(manifest["rank"]) == list(range(7)) and manifest["seed"].is_unique
    assert set(manifest.columns) >= {"key", "seed", "prompt", "spec_hash", "label", "class", "shard", "offset", "size"}
    assert set(manifest["shard"]) == {"chunks/00000.tar", "chunks/00001.tar", "chunks/00002.tar", "chunks/00003.tar"}
    cached = next((tmp_path / "cache_a").glob("*/00000.tar"))  # the class folder's chunks are the cache's files
    assert (tmp_path / "more/chunks/00000.tar").stat().st_ino == cached.stat().st_ino
    if method == "img2img":
        assert list(manifest["source"]) == [0, 1, 2, 3, 0, 1, 2]


def test_changed_setting_does_not_reuse_cache(tiny_sd: Path, target: tuple[Path, Path], tmp_path: Path) -> None:
    base = {"method": "prompt_classname", "n_images": 2, "batch_size": 2, "steps": 2}
    first = generate(tiny_sd, "circle", "circle", 0, tmp_path / "a", tmp_path / "cache",
                     GenerateSpec(**base, guidance_scale=2.0))
    second = generate(tiny_sd, "circle", "circle", 0, tmp_path / "b", tmp_path / "cache",
                      GenerateSpec(**base, guidance_scale=4.0))
    assert first["chunks_made"] == 1 and second["chunks_made"] == 1
    assert _images(tmp_path / "a") != _images(tmp_path / "b")


def test_a_retrained_model_at_the_same_path_does_not_reuse_cache(tiny_sd: Path, target: tuple[Path, Path], tmp_path: Path) -> None:
    """The toy model is rewritten in place, under the same spec, when the CLIP it embeds is retrained: the cache is keyed
    by the folder's content, so new weights make new images, and the same weights rewritten reuse the cached ones."""
    from safetensors.torch import save_file

    model = tmp_path / "diffusion" / "model"
    spec = GenerateSpec(method="prompt_classname", n_images=2, batch_size=2, steps=2)
    made, images = [], []
    for round_ in ("first", "same weights rewritten", "new text encoder"):
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(tiny_sd, model)
        model.with_name("model.meta.json").write_text(json.dumps({"stage": "pretrain_diffusion", "spec": {"unet_steps": 10}}))
        if round_ == "new text encoder":  # what a retrained CLIP does to the toy pipeline; its spec is unchanged
            f = next((model / "text_encoder").glob("*.safetensors"))
            save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in load_file(str(f)).items()}, str(f))
        stats = generate(model, "circle", "circle", 0, tmp_path / "a", tmp_path / "cache", spec)
        made.append(stats["chunks_made"])
        images.append(_images(tmp_path / "a"))
    assert made == [1, 0, 1]
    assert images[0] == images[1] and all(images[2][k] != images[0][k] for k in images[0])


def test_img2img_cache_follows_the_real_images(tiny_sd: Path, target: tuple[Path, Path], tmp_path: Path) -> None:
    """img2img starts from the real images: another real table under the same path is another cache entry."""
    spec = GenerateSpec(method="img2img", n_images=2, batch_size=2, steps=2, strength=0.5)
    table, root = target
    made = []
    for step in ("first", "again", "changed table"):
        if step == "changed table":
            df = pd.read_parquet(table)
            pd.concat([df.iloc[1:], df.iloc[:1]]).to_parquet(table)  # another order: other source images per item
        stats = generate(tiny_sd, "circle", "circle", 0, tmp_path / "a", tmp_path / "cache", spec,
                         real=(table, root))
        made.append(stats["chunks_made"])
    assert made == [1, 0, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_generation_on_gpu_is_repeatable(tiny_sd: Path, tmp_path: Path) -> None:
    spec = GenerateSpec(method="prompt_classname", n_images=4, batch_size=2, steps=3, guidance_scale=2.0)  # precision auto: fp16
    for name in ("a", "b"):
        stats = generate(tiny_sd, "circle", "circle", 0, tmp_path / name,
                         tmp_path / f"cache_{name}", spec)
        assert stats["images"] == 4 and stats["dtype"] == "float16", stats  # precision auto on a GPU: half
    assert _images(tmp_path / "a") == _images(tmp_path / "b")
