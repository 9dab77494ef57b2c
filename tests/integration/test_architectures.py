"""Every architecture of `augbench.architectures` generates through the workflow's own generate job: tiny random
pipelines of the real diffusers / transformers classes (tests/architectures.py), saved and loaded back from their
folders, on non-square photos, with the toy code forbidden; img2img where diffusers has the pipeline; the refusals."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from architectures import build
from conftest import REPO, subprocess_env
from photos import photo
from PIL import Image

from augbench.architectures import REGISTRY, architecture, check_pairs, refusal, resolve
from augbench.generate import call_kwargs
from augbench.methods import REGISTRY as METHODS
from augbench.methods import method
from augbench.shards import pointed_images


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A training table of non-square photos: three of "dog", two of "cat"."""
    root = tmp_path_factory.mktemp("photos")
    rows = []
    for i, (label, name) in enumerate([(0, "dog")] * 3 + [(1, "cat")] * 2):
        path = Path("train") / name / f"{i:03d}.jpg"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        photo(i, label, (48 + 8 * i, 32)).save(root / path, quality=90)
        rows.append({"path": str(path), "label": label, "class": name})
    pd.DataFrame(rows).to_parquet(root / "train.parquet")
    return root / "train.parquet", root


def _generate(model: Path, arch: str, meth: str, out: Path, photos: tuple[Path, Path], scheduler: str) -> dict:
    """The workflow's generate job for both classes, as a process of its own with the toy code forbidden."""
    classes = out.parent / "classes.json"
    classes.write_text(json.dumps({"classes": ["dog", "cat"], "names": {"dog": "dog", "cat": "cat"}}))
    spec = {"method": meth, "n_images": 3, "batch_size": 2, "steps": 2, "guidance_scale": 2.0, "resolution": 32,
            "scheduler": scheduler, "negative_prompt": "bad quality", "strength": 0.7}
    cmd = [sys.executable, "-m", "augbench", "generate", "--model", str(model), "--architecture", arch,
           "--table", str(photos[0]), "--root", str(photos[1]), "--classes", str(classes), "--keys", "dog", "cat",
           "--cache", str(out.parent / f"cache_{meth}"), "--out", str(out),
           "--spec", json.dumps(spec), "--device", "cpu"]
    env = {**subprocess_env(), "AUGBENCH_FORBID_TOY": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_architecture_generates_from_its_saved_folder(name: str, tmp_path: Path, photos: tuple[Path, Path]) -> None:
    arch = architecture(name)
    model = build(name, tmp_path / "model")
    assert resolve(model, "auto") is arch and resolve(model, name) is arch
    other = next(a for a in REGISTRY if a != name)
    with pytest.raises(ValueError, match=f"declared architecture '{other}'.*names '{arch.text2image}'"):
        resolve(model, other)
    scheduler = "dpm" if arch.objective == "noise" else "model"
    methods = ["prompt_classname"] + (["img2img"] if arch.image2image else [])
    for meth in methods:
        out = tmp_path / meth
        _generate(model, name, meth, out, photos, scheduler)
        for key in ("dog", "cat"):
            images = pointed_images(out / key / "manifest.parquet")
            assert len(images) == 3 and len(set(images.values())) == 3, f"{name}/{meth}: one image per seed"
            sizes = {Image.open(io.BytesIO(b)).size for b in images.values()}
            assert sizes == {(32, 32)}, f"{name}/{meth}: {sizes}"
    if arch.image2image:  # SDEdit starts from the photo: the images differ from text-to-image ones of the same seeds
        t2i = pointed_images(tmp_path / "prompt_classname/cat/manifest.parquet")
        i2i = pointed_images(tmp_path / "img2img/cat/manifest.parquet")
        assert not set(t2i.values()) & set(i2i.values())


def test_a_noise_sampler_on_a_flow_matching_model_is_refused(tmp_path: Path, photos: tuple[Path, Path]) -> None:
    model = build("flux", tmp_path / "model")
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classes": ["dog"], "names": {"dog": "dog"}}))
    cmd = [sys.executable, "-m", "augbench", "generate", "--model", str(model), "--table", str(photos[0]), "--root",
           str(photos[1]), "--classes", str(classes), "--keys", "dog", "--cache",
           str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--spec", json.dumps({"scheduler": "dpm"}),
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "flux (FluxPipeline) is a flow_matching model: set scheduler: model" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_refusals_follow_the_architecture_properties() -> None:
    for arch in REGISTRY.values():
        for m in METHODS.values():
            why = refusal(m, arch)
            cannot = ((m.from_real and arch.image2image is None) or (m.learns == "pseudo_word" and not arch.textual_inversion)
                      or (m.finetune_unet and not arch.lora))
            assert (why is not None) == cannot, (m.name, arch.name, why)
    assert refusal(method("img2img"), architecture("sana")) == (
        "diffusers has no image-to-image pipeline for sana (SanaPipeline)")
    with pytest.raises(ValueError, match=r"img2img on diffusion \(pixart_sigma\).*\n.*textual_inversion on diffusion"):
        check_pairs(["real", "img2img", "textual_inversion", "prompt_classname"], architecture("pixart_sigma"))
    check_pairs(list(METHODS), architecture("sd"))  # the Stable Diffusion layout runs every method


def test_the_config_schema_lists_exactly_the_registry() -> None:
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    for node in (schema["properties"]["diffusion"], schema["properties"]["generators"]["additionalProperties"]):
        assert node["properties"]["architecture"]["enum"] == ["auto", *REGISTRY]
    assert all(a.params_b > 0 and a.checkpoints for a in REGISTRY.values())


def test_the_workflow_refuses_a_method_the_declared_architecture_cannot_run() -> None:
    """At parse time, before any job: a dry run over the tiny config with the toy folder declared as another
    architecture stops on the mismatch; a hub id declared as Sana with img2img configured stops on the pair."""
    snakemake = str(Path(sys.executable).parent / "snakemake")
    base = [snakemake, "-n", "--configfile", "config/tiny.yaml", "--directory", str(REPO), "--config"]
    mismatch = subprocess.run([*base, "diffusion={'model': 'models/toy/diffusion', 'architecture': 'flux'}"],
                              env=subprocess_env(), capture_output=True, text=True, cwd=REPO)
    assert mismatch.returncode != 0
    assert "declared architecture 'flux' loads ['FluxPipeline'], but its model_index.json names " \
           "'StableDiffusionPipeline'" in mismatch.stdout + mismatch.stderr
    pair = subprocess.run([*base, "methods=['real', 'img2img']", "diffusion={'model': 'org/sana', 'architecture': 'sana'}"],
                          env={**subprocess_env(), "HF_HUB_OFFLINE": "0"}, capture_output=True, text=True, cwd=REPO)
    assert pair.returncode != 0
    assert "img2img on diffusion.model (sana): diffusers has no image-to-image pipeline" in pair.stdout + pair.stderr
    assert "Job stats" not in mismatch.stdout + pair.stdout, "nothing is planned"


def _job(kind: str, model: Path, arch: str, out: Path, photos: tuple[Path, Path], spec: dict, *extra: str) -> None:
    """The workflow's personalize or generate job for both classes, as a process of its own with the toy code
    forbidden."""
    classes = out.parent / "classes.json"
    classes.write_text(json.dumps({"classes": ["dog", "cat"], "names": {"dog": "dog", "cat": "cat"}}))
    cmd = [sys.executable, "-m", "augbench", kind, "--model", str(model), "--architecture", arch, "--table",
           str(photos[0]), "--root", str(photos[1]), "--classes", str(classes), "--keys", "dog", "cat",
           "--cache", str(out.parent / f"cache_{kind}_{spec['method']}"), "--out", str(out),
           "--spec", json.dumps(spec), "--device", "cpu", *extra]
    proc = subprocess.run(cmd, env={**subprocess_env(), "AUGBENCH_FORBID_TOY": "1"}, capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _sample(pipe) -> np.ndarray:
    """Two sampling steps of one prompt at 32 px from a fixed seed, as the generate job calls the pipeline."""
    kw = call_kwargs(pipe, height=32, width=32, num_inference_steps=2, guidance_scale=2.0, output_type="np",
                     generator=torch.Generator().manual_seed(0))
    return np.asarray(pipe(prompt=["a photo of a dog"], **kw).images, dtype=np.float32)


def _personalised_methods(arch) -> list[tuple[str, str]]:
    """(method, dm_finetune) each architecture personalises with in the test: the pseudo-word with LoRA where textual
    inversion is possible, conditioning vectors with LoRA where a LoRA loader exists, else with the full denoiser."""
    out = [("textual_inversion_dm", "lora")] if arch.textual_inversion else []
    if arch.lora:
        out.append(("cond_vectors_dm", "lora"))
    else:
        out.append(("cond_vectors_dm", "full"))
    return out


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_architecture_personalises_with_its_own_objective(name: str, tmp_path: Path,
                                                              photos: tuple[Path, Path]) -> None:
    """The personalize job trains each architecture (latents, conditioning, objective and denoiser call of
    augbench.denoising) on non-square photos; what it saves loads back through the pipeline's own loaders
    (`load_lora_weights`, `load_textual_inversion`, the denoiser's `from_pretrained`) and changes what it samples; the
    generate job makes each class's images from it."""
    from augbench.generate import apply_personalization, conditioning
    from augbench.personalize import load_pipeline, pseudo_word_files

    arch = architecture(name)
    model = build(name, tmp_path / "model")
    for meth, finetune in _personalised_methods(arch):
        spec = {"method": meth, "steps": 3, "batch_size": 2, "resolution": 32, "lr": 0.05, "dm_lr": 0.05,
                "dm_finetune": finetune, "lora_rank": 2}
        out = tmp_path / f"personalize_{meth}"
        _job("personalize", model, name, out, photos, spec)
        folder = out / "dog"
        info = json.loads((folder / "personalization.json").read_text())
        assert np.isfinite(info["final_loss"]), info
        pipe = load_pipeline(model, architecture=name)
        before = _sample(pipe)
        if finetune == "lora":  # the adapters of the denoiser, in the pipeline's LoRA format
            from safetensors.torch import load_file

            keys = list(load_file(str(folder / "pytorch_lora_weights.safetensors")))
            assert keys and all(k.startswith(f"{arch.denoiser}.") and "lora" in k for k in keys), keys[:3]
            pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
            assert np.abs(_sample(pipe) - before).max() > 1e-4, f"{name}: the loaded LoRA changes nothing"
            pipe.unload_lora_weights()
            np.testing.assert_allclose(_sample(pipe), before, atol=1e-5)  # unloaded: the base model again
        if info["token"]:  # one row per CLIP encoder, each in its own file
            files = pseudo_word_files(pipe)
            assert sorted(p.name for p in folder.glob("learned_embeds*")) == sorted(files.values())
        loaded = apply_personalization(pipe, folder)
        assert loaded["method"] == meth
        if info["token"]:
            for encoder in pseudo_word_files(pipe):
                tokenizer = getattr(pipe, encoder.replace("text_encoder", "tokenizer"))
                assert info["token"] in tokenizer.get_vocab(), f"{name}: {encoder} lacks the pseudo-word"
        else:
            cond = conditioning(folder)
            wanted = {n for n in arch.prompt_outputs if n and "mask" not in n}
            assert wanted <= set(cond) and len(cond["prompt_embeds"]) == 3, (sorted(cond), wanted)
        assert np.abs(_sample(pipe) - before).max() > 1e-4, f"{name}/{meth}: the personalisation changes nothing"
        gen = tmp_path / f"generate_{meth}"
        _job("generate", model, name, gen, photos, {"method": meth, "n_images": 2, "batch_size": 2, "steps": 2,
             "guidance_scale": 2.0, "resolution": 32, "scheduler": "model"}, "--personalization", str(out))
        for key in ("dog", "cat"):
            images = pointed_images(gen / key / "manifest.parquet")
            assert len(set(images.values())) == 2, f"{name}/{meth}/{key}: one image per seed"


#: the denoiser's keyword for each conditioning tensor the personalisation code passes under the pipeline call's name
_DENOISER_NAMES = {"encoder_hidden_states": "prompt_embeds", "pooled_projections": "pooled_prompt_embeds",
                   "encoder_attention_mask": "prompt_attention_mask", "encoder_hidden_states_mask": "prompt_embeds_mask"}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_training_call_is_the_pipelines_sampling_call(name: str, tmp_path: Path) -> None:
    """`augbench.denoising.predict` calls each denoiser as its pipeline does while sampling: the denoiser's inputs
    and output in one sampling step, captured, are reproduced from the latents in [n, c, h, w] layout, the pipeline's
    timestep (x 1000 where the pipeline divides by 1000) and the conditioning under the call's names. A wrong packing,
    timestep scale, size conditioning or learned-sigma split fails here."""
    from augbench.denoising import denoiser_of, predict
    from augbench.personalize import load_pipeline

    pipe = load_pipeline(build(name, tmp_path / "model"), architecture=name)
    denoiser = denoiser_of(pipe)
    seen: dict = {}

    def capture(_module, args, kwargs, output) -> None:
        seen.setdefault("call", (args, kwargs, output[0] if isinstance(output, tuple) else output.sample))

    handle = denoiser.register_forward_hook(capture, with_kwargs=True)
    kw = call_kwargs(pipe, height=32, width=32, num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pipe(prompt=["a photo of a dog"], **kw)
    handle.remove()
    args, kwargs, output = seen["call"]
    latents = kwargs.get("hidden_states", args[0] if args else kwargs.get("sample"))
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    side = 32 // pipe.vae_scale_factor
    packed = latents.dim() == 3  # FLUX / Qwen-Image: 2x2 patches as tokens
    if packed:
        c = latents.shape[-1] // 4
        latents = latents.view(1, side // 2, side // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, c, side, side)
        t = t * 1000
    cond = {ours: kwargs[theirs] for theirs, ours in _DENOISER_NAMES.items() if kwargs.get(theirs) is not None}
    if "added_cond_kwargs" in kwargs and kwargs["added_cond_kwargs"] and "text_embeds" in kwargs["added_cond_kwargs"]:
        cond["pooled_prompt_embeds"] = kwargs["added_cond_kwargs"]["text_embeds"]
    with torch.no_grad():
        ours = predict(pipe, latents, t, cond)
    if packed:
        output = output.view(1, side // 2, side // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, c, side, side)
    elif output.shape[1] != ours.shape[1]:  # learned sigma: the pipeline splits off the variance after the call
        output = output.chunk(2, dim=1)[0]
    torch.testing.assert_close(ours, output)


@pytest.mark.parametrize("name", [a.name for a in REGISTRY.values() if a.objective == "flow_matching"])
def test_the_flow_matching_target_is_what_the_sampler_integrates(name: str, tmp_path: Path) -> None:
    """One Euler step of the model's own flow-matching sampler from x_t at sigma down to sigma 0, with the training
    target as the model output, lands on the clean latents; the timestep the denoiser sees is sigma x 1000 (the
    sampler's), and the sigmas follow the logit-normal draw (all inside (0, 1), not uniform)."""
    from augbench.denoising import noised, training_scheduler
    from augbench.personalize import load_pipeline

    pipe = load_pipeline(build(name, tmp_path / "model"), architecture=name)
    sched = training_scheduler(pipe)
    z0 = torch.randn(512, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    zt, t, target, weight = noised(pipe, sched, z0, torch.Generator().manual_seed(2))
    sigma = t.float() / sched.config.num_train_timesteps
    torch.testing.assert_close(zt - sigma.view(-1, 1, 1, 1) * target, z0, rtol=0, atol=1e-4)
    assert weight is not None and torch.all(weight == 1)
    assert 0 < sigma.min() and sigma.max() < 1
    assert (sigma - 0.5).abs().mean() < 0.2, "logit-normal draws crowd the middle (uniform: 0.25)"


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_gradient_checkpointing_changes_memory_not_results(name: str, tmp_path: Path) -> None:
    """`personalize.gradient_checkpointing` recomputes the denoiser's activations in the backward pass: the same
    LoRA and conditioning to the bit (on the CPU), with fewer bytes kept for the backward pass (counted from autograd's
    saved tensors), and the shared denoiser is left without it."""
    from augbench.denoising import denoiser_of
    from augbench.personalize import TrainingSource, encode_latents, train_personalization
    from augbench.specs import PersonalizeSpec

    source = TrainingSource(build(name, tmp_path / "model"), torch.device("cpu"), architecture=name)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    spec = PersonalizeSpec(method="cond_vectors_dm", steps=2, batch_size=2, dm_lr=0.01, lora_rank=2)
    results, saved = [], []
    for checkpointing in (False, True):
        pipe = source.pipeline(spec.method)
        latents = encode_latents(pipe, images)
        kept = {"bytes": 0}

        def pack(t: torch.Tensor, kept: dict = kept) -> torch.Tensor:
            kept["bytes"] += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            learned = train_personalization(pipe, latents, np.arange(3), "dog", "dog", spec,
                                            gradient_checkpointing=checkpointing)
        denoiser = denoiser_of(pipe)
        assert not denoiser.is_gradient_checkpointing, "the shared denoiser keeps no checkpointing"
        lora = {k: v.detach().clone() for k, v in denoiser.state_dict().items() if "lora" in k}
        results.append((learned.final_loss, learned.cond["prompt_embeds"].detach().clone(), lora))
        saved.append(kept["bytes"])
        source.release(pipe)
    (loss_a, cond_a, lora_a), (loss_b, cond_b, lora_b) = results
    assert loss_a == loss_b and torch.equal(cond_a, cond_b) and lora_a.keys() == lora_b.keys()
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    assert saved[1] < 0.8 * saved[0], saved


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_a_shared_adapter_learns_one_lora_and_a_pseudo_word_per_class(name: str, tmp_path: Path,
                                                                     photos: tuple[Path, Path]) -> None:
    """`shared_adapter`: one personalize job over every class trains one LoRA jointly with a pseudo-word per class
    (in each CLIP encoder); each class's folder holds its own pseudo-word and a link to the one adapter, loads through
    the pipeline's loaders, and the generate job makes each class's images from it."""
    from safetensors.torch import load_file

    from augbench.generate import apply_personalization
    from augbench.personalize import load_pipeline, pseudo_word_files

    model = build(name, tmp_path / "model")
    spec = {"method": "shared_adapter", "shared_steps": 4, "batch_size": 2, "resolution": 32, "lr": 0.05,
            "dm_lr": 0.05, "lora_rank": 2}
    out = tmp_path / "personalize"
    _job("personalize", model, name, out, photos, spec)
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert meta["stats"]["classes"] == 2 and meta["stats"]["steps"] == 4, meta["stats"]
    adapters = [out / k / "pytorch_lora_weights.safetensors" for k in ("dog", "cat")]
    assert adapters[0].read_bytes() == adapters[1].read_bytes(), "one adapter for every class"
    pipe = load_pipeline(model, architecture=name)
    before = _sample(pipe)
    vectors = {}
    for key in ("dog", "cat"):
        info = json.loads((out / key / "personalization.json").read_text())
        assert info["token"] == f"<{key}>" and info["shared"], info
        for f in pseudo_word_files(pipe).values():
            assert list(load_file(str(out / key / f))) == [info["token"]], "each class's file holds its own word"
            vectors[key, f] = next(iter(load_file(str(out / key / f)).values()))
        apply_personalization(pipe, out / key)
    for f in pseudo_word_files(pipe).values():
        assert not torch.equal(vectors["dog", f], vectors["cat", f])
    assert np.abs(_sample(pipe) - before).max() > 1e-4, "the adapter changes what the pipeline samples"
    gen = tmp_path / "generate"
    _job("generate", model, name, gen, photos, {"method": "shared_adapter", "n_images": 2, "batch_size": 2, "steps": 2,
         "guidance_scale": 2.0, "resolution": 32, "scheduler": "model"}, "--personalization", str(out))
    for key in ("dog", "cat"):
        assert len(set(pointed_images(gen / key / "manifest.parquet").values())) == 2


def test_a_killed_shared_adapter_run_resumes_to_the_same_bytes(tmp_path: Path, photos: tuple[Path, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared run checkpoints (adapter, token rows, optimiser, random state) every SHARED_CHECKPOINT_EVERY
    steps; killed after a checkpoint, it resumes from it and ends with the adapter and pseudo-words of a run that was
    never killed."""
    import augbench.personalize as personalize
    from augbench.specs import PersonalizeSpec

    model = build("sd", tmp_path / "model")
    monkeypatch.setattr(personalize, "SHARED_CHECKPOINT_EVERY", 2)
    classes = [("dog", 0, "dog"), ("cat", 1, "cat")]
    spec = PersonalizeSpec(method="shared_adapter", shared_steps=5, batch_size=2, resolution=32, lr=0.05, dm_lr=0.05,
                           lora_rank=2)

    def run(where: Path) -> dict[str, bytes]:
        personalize.personalize_block(model, photos[0], photos[1], classes, where / "out", where / "cache", spec)
        return {str(f.relative_to(where / "out")): f.read_bytes() for f in sorted((where / "out").rglob("*.safetensors"))}

    whole = run(tmp_path / "whole")
    train = personalize._Run.train
    steps_seen: list[int] = []

    def killed(self, batch, steps, dm, checkpointing, start=0, on_step=None):  # type: ignore[no-untyped-def]
        def step_then_die(step: int) -> None:
            on_step(step)
            steps_seen.append(step)
            if step == 2:
                raise RuntimeError("killed")

        return train(self, batch, steps, dm, checkpointing, start, step_then_die)

    monkeypatch.setattr(personalize._Run, "train", killed)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "resumed")
    assert list((tmp_path / "resumed/cache").glob("*.work/checkpoint.pt")), "a checkpoint is left behind"
    monkeypatch.setattr(personalize._Run, "train", train)
    resumed = run(tmp_path / "resumed")
    assert steps_seen == [0, 1, 2]
    meta = json.loads((tmp_path / "resumed/out.meta.json").read_text())
    assert meta["stats"]["resumed_at"] == 2, meta["stats"]
    assert resumed == whole and len(whole) == 4, sorted(whole)
