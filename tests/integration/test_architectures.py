"""Every architecture of `augbench.architectures` generates through the workflow's own generate job: tiny random
pipelines of the real diffusers / transformers classes (tests/architectures.py), saved and loaded back from their
folders, on non-square photos, with the toy code forbidden; img2img where diffusers has the pipeline; the refusals."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from architectures import build
from conftest import REPO, subprocess_env
from photos import photo
from PIL import Image

from augbench.architectures import REGISTRY, architecture, check_pairs, refusal, resolve
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
            cannot = (m.from_real and arch.image2image is None) or (m.personalized and arch.name != "sd")
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
