"""Generate a class's augmentation images with a (personalised) text-to-image diffusion model.

Determinism: image j of (method, class) is sampled with its own generator seeded by
`item_seed(seed, method, class, j)`, in fixed chunks of `batch_size` items (chunk c always holds
items c*b .. c*b+b-1, so each chunk's batch is the same whatever the number of images asked for).
Finished chunks are cached as tar shards under a key of everything that fixes their pixels; asking
for more images appends chunks and leaves the earlier ones, byte for byte, as they were.

Methods: `prompt_classname`, `prompt_templates` (CLIP's 80 templates, item j uses template j mod 80),
`img2img` (real image j mod n, partly noised and denoised: `strength`), and the personalised ones
(see augbench.personalize), whose folder is applied to the freshly loaded pipeline.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from augbench.denoising import architecture_of, denoiser_of
from augbench.device import pick_device
from augbench.io import atomic_dir, content_id, parquet_appender, write_json, write_meta, write_parquet
from augbench.methods import method as registry_row
from augbench.personalize import PipelineSource, class_images, link_tree_file, resolution_of
from augbench.prompts import CLASSNAME, IMAGENET_TEMPLATES
from augbench.shards import Sample, read_pointed, rebase, with_pointers, write_shard
from augbench.specs import GENERATE_QUIET_DEFAULTS, GenerateSpec, canonical_json, item_seed, quiet_defaults, spec_dict

log = logging.getLogger(__name__)

SCHEDULERS = {  # noise-prediction samplers; "model" keeps the one the model folder ships (flow-matching models need it)
    "model": None,
    "dpm": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's sampler, keeping the model's noise schedule (its scheduler config); `model` keeps the sampler
    as shipped. The swappable samplers integrate a noise prediction: on a flow-matching model they are refused."""
    import diffusers

    from augbench.architectures import architecture

    if name not in SCHEDULERS:
        raise ValueError(f"generate: unknown scheduler {name!r}; known: {sorted(SCHEDULERS)}")
    if SCHEDULERS[name] is None:
        return
    arch = architecture(getattr(pipe, "augbench_architecture", "sd"))
    if arch.objective != "noise":
        raise ValueError(f"generate: scheduler {name!r} samples noise-prediction models; {arch.name} "
                         f"({arch.text2image}) is a {arch.objective} model: set scheduler: model")
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def apply_personalization(pipe, folder: Path) -> dict:
    """Load a personalisation folder into `pipe` through the pipeline's own loaders: the pseudo-word into each CLIP
    encoder it was trained in, the LoRA adapters, or the fine-tuned denoiser; returns its description.

    Conditioning vectors are not part of the pipeline; they are read by `conditioning`.
    """
    from augbench.personalize import pseudo_word_files

    info = json.loads((folder / "personalization.json").read_text())
    arch = architecture_of(pipe)
    if info.get("token"):
        for encoder, weight_name in pseudo_word_files(pipe).items():
            if (folder / weight_name).exists():
                pipe.load_textual_inversion(str(folder), weight_name=weight_name, token=info["token"],
                                            text_encoder=getattr(pipe, encoder),
                                            tokenizer=getattr(pipe, encoder.replace("text_encoder", "tokenizer")))
    if (folder / "pytorch_lora_weights.safetensors").exists():
        pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    if (folder / arch.denoiser).is_dir():
        denoiser = getattr(pipe, arch.denoiser)
        tuned = type(denoiser).from_pretrained(folder / arch.denoiser, dtype=denoiser.dtype).to(denoiser.device)
        setattr(pipe, arch.denoiser, tuned)
    return info


@contextlib.contextmanager
def personalisation_loaded(pipe, folder: Path) -> Iterator[dict]:
    """The shared pipeline with one class's personalisation loaded, and without it again afterwards: no per-class copy
    of the denoiser or the text encoders (a Stable Diffusion UNet is 1.7 GB in fp16, per class of a block).

    What loading changes is put back: LoRA adapters are unloaded (unfused, so the base weights were never touched); a
    pseudo-word's tokenizers are copies (small) and `load_textual_inversion` gives each CLIP encoder's token matrix a
    new, larger weight, so the original weights and vocabulary sizes are restored; a fully fine-tuned denoiser replaces
    the shared one only while the class generates. tests/integration/test_blocks.py checks each class's images equal
    its own process's.
    """
    arch = architecture_of(pipe)
    encoders = [name for name, kind in arch.text_encoders if kind == "clip"]
    saved_denoiser = getattr(pipe, arch.denoiser)
    saved = []
    for name in encoders:
        encoder = getattr(pipe, name)
        embeddings = encoder.get_input_embeddings()
        tokenizer = name.replace("text_encoder", "tokenizer")
        saved.append({"encoder": encoder, "tokenizer_name": tokenizer, "tokenizer": getattr(pipe, tokenizer),
                      "embeddings": embeddings, "weight": embeddings.weight, "data": embeddings.weight.data,
                      "rows": embeddings.num_embeddings, "vocab": encoder.config.vocab_size})
        setattr(pipe, tokenizer, copy.deepcopy(getattr(pipe, tokenizer)))
    try:
        yield apply_personalization(pipe, folder)
    finally:
        setattr(pipe, arch.denoiser, saved_denoiser)
        if getattr(saved_denoiser, "peft_config", None) or any(getattr(s["encoder"], "peft_config", None) for s in saved):
            pipe.unload_lora_weights()
        for s in saved:
            # transformers resizes the token matrix in place (the same module and parameter get new, larger data): the
            # module, its parameter and the parameter's data are all put back
            s["weight"].data = s["data"]
            s["embeddings"].weight, s["embeddings"].num_embeddings = s["weight"], s["rows"]
            s["encoder"].set_input_embeddings(s["embeddings"])
            s["encoder"].config.vocab_size = s["vocab"]
            setattr(pipe, s["tokenizer_name"], s["tokenizer"])


def conditioning(folder: Path) -> dict[str, torch.Tensor]:
    """The learned conditioning of a cond_* folder, by the name the pipeline's call takes it under (`prompt_embeds`
    [n_vectors, seq, dim], and `pooled_prompt_embeds` or an attention mask where the architecture has them)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "cond.safetensors"))
    return {("prompt_embeds" if k == "cond" else k): v for k, v in tensors.items() if k != "assign"}


def plan(spec: GenerateSpec, class_key: str, class_name: str, n: int, token: str | None = None,
         n_sources: int = 0, n_vectors: int = 0) -> pd.DataFrame:
    """One row per image to make: index, seed, prompt, and the source image or conditioning vector it uses."""
    m = registry_row(spec.method)
    rows = []
    for j in range(n):
        row = {"index": j, "seed": item_seed(spec.seed, spec.method, class_key, j), "prompt": None, "source": -1, "vector": -1}
        if m.prompt == "templates":
            row["prompt"] = IMAGENET_TEMPLATES[j % len(IMAGENET_TEMPLATES)].format(class_name)
        elif m.learns == "pseudo_word":
            row["prompt"] = spec.prompt.format(token)
        elif m.personalized:  # conditioning vectors: each image uses one, in turn
            row["vector"] = j % n_vectors
        else:
            row["prompt"] = spec.prompt.format(class_name)
        if m.from_real:
            row["source"] = j % n_sources
        rows.append(row)
    return pd.DataFrame(rows)


def encode_image(image: Image.Image, spec: GenerateSpec) -> bytes:
    """The stored form of a generated image: at `store_size` (shorter side, as torchvision's Resize) where set, in
    `store_format` (png lossless; jpg / webp at `store_quality`). The classifier reads this one copy."""
    if spec.store_size and min(image.size) != spec.store_size:
        w, h = image.size
        scale = spec.store_size / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[spec.store_format]
    image.save(buf, format=fmt, **({} if fmt == "PNG" else {"quality": spec.store_quality}))
    return buf.getvalue()


def call_kwargs(pipe, optional: tuple[str, ...] = (), **wanted: object) -> dict[str, object]:
    """The keyword arguments of `wanted` that the pipeline's call takes, plus its architecture's fixed ones
    (`Architecture.call`). A setting the call cannot take is dropped only where that changes nothing (a negative
    prompt of "" or none; a size in `optional`, which the pipeline then takes from its input image); otherwise it is
    an error naming the pipeline."""
    import inspect

    from augbench.architectures import architecture

    arch = architecture(getattr(pipe, "augbench_architecture", "sd"))
    takes = inspect.signature(type(pipe).__call__).parameters
    out = {k: v for k, v in arch.call if k in takes}
    for k, v in wanted.items():
        if k in takes:
            out[k] = v
        elif k in optional or (k == "negative_prompt" and not any(v or [])):
            continue
        else:
            raise ValueError(f"generate: {type(pipe).__name__} ({arch.name}) takes no {k}")
    return out


def _run_chunk(pipe, spec: GenerateSpec, rows: pd.DataFrame, size: int, sources: np.ndarray | None,
               cond: torch.Tensor | None) -> list[Image.Image]:
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in rows["seed"]]
    common = {"num_inference_steps": spec.steps, "guidance_scale": spec.guidance_scale, "generator": gens}
    neg = [spec.negative_prompt] * len(rows) if spec.guidance_scale > 1 else None
    if registry_row(spec.method).from_real:
        import diffusers

        from augbench.architectures import architecture

        arch = architecture(getattr(pipe, "augbench_architecture", "sd"))
        if arch.image2image is None:
            raise ValueError(f"generate: {spec.method} starts from real images; {arch.name} has no image-to-image pipeline")
        i2i = getattr(diffusers, arch.image2image).from_pipe(pipe)
        i2i.set_progress_bar_config(disable=True)
        i2i.augbench_architecture = arch.name
        init = [Image.fromarray(sources[int(i)]) for i in rows["source"]]
        kw = call_kwargs(i2i, ("height", "width"), negative_prompt=neg, strength=spec.strength, height=size, width=size,
                         **common)
        return i2i(prompt=list(rows["prompt"]), image=init, **kw).images
    if cond is not None:  # learned conditioning: each image's vector, under the names the call takes
        pick = torch.as_tensor(rows["vector"].to_numpy())
        dtype = denoiser_of(pipe).dtype
        device = getattr(pipe, "_execution_device", pipe.device)  # the GPU, also under CPU offload
        given = {k: v[pick].to(device, dtype) if v.is_floating_point() else v[pick].to(device) for k, v in cond.items()}
        kw = call_kwargs(pipe, negative_prompt=neg, height=size, width=size, **common, **given)
        return pipe(**kw).images
    kw = call_kwargs(pipe, negative_prompt=neg, height=size, width=size, **common)
    return pipe(prompt=list(rows["prompt"]), **kw).images


def cache_ident(spec: GenerateSpec, model: str | Path, class_key: str, personalization: Path | None,
                real_table: Path | None = None) -> dict[str, object]:
    """Everything that fixes the pixels of a chunk: spec minus `n_images`, and the *content* of the model folder, the
    class's personalisation folder and (img2img) the real table.

    A retrained model or personalisation lands at the same path, often under the same spec (a retrained CLIP
    changes the toy diffusion model's text encoder, not its spec): keyed by path or spec, the cache would hand
    back the old model's images. `augbench.io.content_id` hashes small files and names big ones by size and
    mtime, so a 4 GB checkpoint costs no read; a hub snapshot is named by its commit.
    """
    spec_part = quiet_defaults(spec_dict(replace(spec, n_images=0)), GENERATE_QUIET_DEFAULTS)
    ident: dict[str, object] = {"spec": spec_part, "model": _content(model), "class": class_key}
    if personalization is not None:
        ident["personalization"] = content_id(personalization)
    if real_table is not None:
        ident["real"] = content_id(real_table)
    return ident


def cache_key(ident: dict[str, object]) -> str:
    """The chunk cache's folder name for an identity from `cache_ident`."""
    return hashlib.sha256(canonical_json(ident).encode()).hexdigest()[:16]


def _explain_miss(cache: Path, ident: dict[str, object]) -> None:
    """Log why chunk sets already in the cache are not used: which part of their identity differs."""
    for other in sorted(cache.glob("*/ident.json")):
        old = json.loads(other.read_text())
        diff = [k for k in sorted(set(old) | set(ident)) if old.get(k) != ident.get(k)]
        log.info("generate: cached chunks %s not used: %s changed", other.parent.name, ", ".join(diff) or "nothing (?)")


def _content(model: str | Path) -> str:
    """A model's content id; a name that is no folder (a hub id loaded directly) stands for itself."""
    return content_id(model) if Path(model).exists() else str(model)


def generate(model: str | Path, class_key: str, class_name: str, label: int, out: Path,
             cache: Path, spec: GenerateSpec, personalization: Path | None = None,
             real: tuple[Path, Path] | None = None, source: PipelineSource | None = None) -> dict[str, object]:
    """Make `spec.n_images` images of one class with `spec.method`; reuse cached chunks; write the class folder `out`:
    `chunks/<c>.tar` (hard links to the cached chunks: the images are stored once) and `manifest.parquet`, whose
    pointer columns (shard, offset, size) locate each image in them.

    `source` is the block worker's pipeline source (loaded once for all its classes); None loads the model here.
    """
    started = time.time()
    device = pick_device()
    dtype = precision_of(spec, device)
    m = registry_row(spec.method)
    ident = cache_ident(spec, model, class_key, personalization, real[0] if m.from_real and real else None)
    key = cache_key(ident)
    chunk_dir = cache / key
    if not chunk_dir.exists():
        _explain_miss(cache, ident)
        chunk_dir.mkdir(parents=True)
        write_json(chunk_dir / "ident.json", ident)
    n, b = spec.n_images, spec.batch_size
    n_chunks = -(-n // b)
    missing = [c for c in range(n_chunks) if not (chunk_dir / f"{c:05d}.tar").exists()]
    personalised = m.personalized
    if personalised and personalization is None:
        raise ValueError(f"generate: method {spec.method} needs its personalisation folder")
    if m.from_real and real is None:
        raise ValueError(f"generate: {spec.method} starts from the real images: it needs the real training table and root")
    token = json.loads((personalization / "personalization.json").read_text()).get("token") if personalised else None
    cond = conditioning(personalization) if m.learns in ("cond_vectors", "cond_clusters") else None
    n_vectors = 0 if cond is None else len(cond["prompt_embeds"])
    n_sources = int((pd.read_parquet(real[0])["label"] == label).sum()) if m.from_real else 0
    pipe, sources, size = None, None, spec.resolution
    rows = plan(spec, class_key, class_name, n_chunks * b, token, n_sources, n_vectors)
    if missing:  # everything cached: no model is loaded at all
        source = source or PipelineSource(model, device, dtype)
        pipe = source.base()
        set_scheduler(pipe, spec.scheduler)
        if spec.vae_tiling:
            pipe.vae.enable_tiling()
        elif getattr(pipe.vae, "use_tiling", False):
            pipe.vae.disable_tiling()
        size = spec.resolution or resolution_of(pipe)
        if m.from_real:
            sources = class_images(real[0], real[1], label, size)
        # a personalisation is loaded into the shared pipeline for this class and taken out after it
        with personalisation_loaded(pipe, personalization) if personalised else contextlib.nullcontext():
            for c in missing:
                chunk = rows.iloc[c * b:(c + 1) * b]
                images = _run_chunk(pipe, spec, chunk, size, sources, cond)
                samples = [Sample(key=f"{class_key}_{j:06d}", image=encode_image(im, spec), ext=spec.store_format,
                                  caption=str(p or ""), record={"seed": int(s), "index": int(j)})
                           for im, j, s, p in zip(images, chunk["index"], chunk["seed"], chunk["prompt"], strict=True)]
                write_shard(chunk_dir / f"{c:05d}.tar", samples)
                log.info("generate %s/%s: chunk %d/%d (%.0fs)", spec.method, class_key, c + 1, n_chunks,
                         time.time() - started)
    manifest = rows.iloc[:n].copy()
    manifest.insert(0, "key", [f"{class_key}_{j:06d}" for j in manifest["index"]])
    manifest["class"] = class_key
    manifest["label"] = label
    manifest["rank"] = manifest["index"]
    manifest["spec_hash"] = key
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    parts = []
    for c in range(n_chunks):
        link_tree_file(chunk_dir / f"{c:05d}.tar", out / "chunks" / f"{c:05d}.tar")
        part = manifest.iloc[c * b:(c + 1) * b]
        parts.append(with_pointers(part, out / "chunks" / f"{c:05d}.tar", out))
    manifest = pd.concat(parts, ignore_index=True)
    write_parquet(out / "manifest.parquet", manifest)
    stats = {"images": len(manifest), "chunks_made": len(missing), "chunks_reused": n_chunks - len(missing),
             "dtype": str(dtype).removeprefix("torch."), "device": device.type}
    write_meta(out / "manifest.parquet", "generate", spec_dict(spec), started, model=str(model), class_key=class_key,
               cache_key=key, stats=stats)
    log.info("generate %s/%s: %s in %.1fs", spec.method, class_key, stats, time.time() - started)
    return stats


def precision_of(spec: GenerateSpec, device: torch.device) -> torch.dtype:
    """fp16 where asked, or on a GPU under `auto`; fp32 on the CPU."""
    half = spec.precision == "fp16" or (spec.precision == "auto" and device.type == "cuda")
    return torch.float16 if half else torch.float32


def generate_block(model: str | Path, classes: list[tuple[str, int, str]], out: Path, cache: Path, spec: GenerateSpec,
                   personalization: Path | None = None, real: tuple[Path, Path] | None = None,
                   architecture: str | None = None, offload: str = "none") -> dict[str, object]:
    """Generate every class of a block in one process: the model is loaded once (only if a chunk is missing), through
    the pipeline class of its `architecture` (declared and checked against `model_index.json`, or read from it).

    Writes `out/<class key>/manifest.parquet` and `chunks/` for each class; chunks live in `cache/<class key>/`,
    outside the block's folder, so a killed block keeps what it made and a rerun appends as a per-class job would.
    """
    started = time.time()
    device = pick_device()
    source = PipelineSource(model, device, precision_of(spec, device), architecture, offload)
    per_class = {}
    with atomic_dir(out) as tmp:
        for key, label, name in classes:
            per_class[key] = generate(model, key, name, label, tmp / key, cache / key, spec,
                                      personalization / key if personalization else None, real, source)
    images = sum(int(s["images"]) for s in per_class.values())
    seconds = time.time() - started
    stats = {"classes": len(classes), "images": images, "pipeline_loads": source.loads,
             "images_per_s": round(images / seconds, 3) if seconds else None,
             "chunks_made": sum(int(s["chunks_made"]) for s in per_class.values())}
    if device.type == "cuda":
        stats["max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    write_meta(out, "generate", spec_dict(spec), started, model=str(model), stats=stats)
    log.info("generate %s: %s in %.1fs", spec.method, stats, seconds)
    return stats


FIDELITY_BATCH = 256  # decoded images held at once by collect


def collect(manifests: list[Path], classes: Path, clip_model: str | Path, out_manifest: Path,
            out_fidelity: Path) -> dict[str, object]:
    """Join a method's per-class manifests into its augmentation set and measure its generation fidelity, streaming.

    The set is a manifest of pointers into the per-class chunk shards (rebased to `out_manifest`'s folder): no image
    is copied. Fidelity is the share of generated images that CLIP, zero-shot over "a photo of a {name}." for every
    class, assigns to the class they were generated for. One class's manifest is held at a time and its rows are
    appended to the set's parquet as they are read; images are decoded `FIDELITY_BATCH` at a time and only counts
    are kept, so memory does not grow with the number of images or of classes (ImageNet's 512k generated images).
    """
    from augbench.embed import Clip
    from augbench.imaging import open_rgb

    started = time.time()
    info = json.loads(Path(classes).read_text())
    keys = list(info["classes"])
    names = [info["names"][k] for k in keys]
    out_dir = Path(out_manifest).parent
    clip = Clip(clip_model)
    text = clip.texts([CLASSNAME.format(n) for n in names])
    total = np.zeros(len(keys), dtype=np.int64)
    right = np.zeros(len(keys), dtype=np.int64)
    batch: list[tuple[int, bytes, str]] = []  # (label, image bytes, name for an error)

    def flush() -> None:
        images = [open_rgb(data, name=name) for _, data, name in batch]
        labels = np.array([label for label, _, _ in batch])
        pred = np.argmax(clip.images(images) @ text.T, axis=1)
        np.add.at(total, labels, 1)
        np.add.at(right, labels, pred == labels)
        batch.clear()

    with parquet_appender(out_manifest) as append:
        for m in manifests:
            part = rebase(pd.read_parquet(m), Path(m).parent, out_dir)
            append(part)
            if part.empty:
                continue
            labels = part["label"].to_numpy()
            names_of = (part["key"].astype(str) + " (" + part["shard"].astype(str) + ")").to_numpy()
            for i, data in read_pointed(part, out_dir):
                batch.append((int(labels[i]), data, str(names_of[i])))
                if len(batch) == FIDELITY_BATCH:
                    flush()
        if batch:
            flush()
    images = int(total.sum())
    per_class = {keys[c]: float(right[c] / total[c]) for c in range(len(keys)) if total[c]}
    result = {"generation_fidelity": float(right.sum() / images) if images else float("nan"),
              "per_class": per_class, "images": images}
    write_json(out_fidelity, result)
    write_meta(out_manifest, "collect", {}, started, clip=str(clip_model), stats={"images": images})
    return result
