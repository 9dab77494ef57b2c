"""Stage specs: the settings a rule hands to the library, as one canonical JSON string.

A spec is a frozen dataclass that refuses unknown keys, so a typo in the config is an error and
not a silently used default. `STAGE_VERSIONS` is folded into each spec by the workflow: bump a
stage's number in the commit that changes what it produces, so expensive work re-runs on purpose.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

# Thread and process counts are not settings: they change how fast a job runs, not what it makes, so no spec holds
# one (changing them reruns nothing); the CLI's --threads sets them per job.
STAGE_VERSIONS: dict[str, int] = {
    "world": 1,
    "target": 1,
    "download": 2,  # 2: url cache keyed by (url or served file content, download settings)
    "pretrain_clip": 2,  # 2: one random shift per image
    "embed": 2,  # 2: CLIP in embed.precision on a GPU (fp16), not fp32 whatever the setting
    "index": 1,
    "retrieve": 3,  # 2: exact search over pool parts, derived k, cross-class resolution, over-fetch; 3: leaks confirmed
    # whatever the copy's geometry (copies.py)
    "search": 1,
    "fetch": 4,  # 2: over-fetched candidates, content check, sharded resumable downloads; 3: manifest with pointers;
    # 4: a url good for two classes goes to the higher score; leaks whatever the geometry; per-class reasons
    "train": 4,  # 3: one random shift per image; skipped images counted in the metrics; 4: reads pointers, decode cache
    "report": 2,  # 2: generator and guidance columns
    "pretrain_diffusion": 3,  # 2: one random shift per image; 3: mirrored images encoded, not latents flipped
    "personalize": 4,  # 2: LoRA initialised from a seeded generator; 3: class blocks, micro-batched VAE encoding;
    # 4: crops of the shorter-side-resized images (centre and both ends), never squashed
    "generate": 3,  # 2: class blocks, one stored copy (chunks + pointers) at store_size / store_format; 3: img2img
    # starts from the centre crop, not a squashed image
    "collect": 2,  # 2: streams: a manifest of pointers, fidelity in batches of 256
    "filter": 1,
}

T = TypeVar("T")


def canonical_json(data: Any) -> str:
    """One spelling per value: sorted keys, no spaces. Snakemake compares params as strings."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def parse_spec(cls: type[T], text: str | dict[str, Any]) -> T:
    """Build spec `cls` from JSON text or a dict, naming any unknown key in the error."""
    data = json.loads(text) if isinstance(text, str) else dict(text)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; known keys: {sorted(names)}")
    return cls(**data)


def spec_dict(spec: Any) -> dict[str, Any]:
    """The spec as a plain dict (for `.meta.json` sidecars)."""
    return asdict(spec)


def spec_hash(spec: Any) -> str:
    """Short stable hash of a spec, recorded in manifests."""
    return hashlib.sha256(canonical_json(spec_dict(spec)).encode()).hexdigest()[:16]


def item_seed(base: int, *keys: object) -> int:
    """A seed derived from (base seed, stage keys): never a global RNG state.

    Hashing makes seeds independent of iteration order, so asking for more items appends
    without changing the ones already made.
    """
    text = "\x1f".join([str(base), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def rng(base: int, *keys: object) -> random.Random:
    """A `random.Random` seeded by `item_seed`."""
    return random.Random(item_seed(base, *keys))


@dataclass(frozen=True)
class WorldSpec:
    """The toy world: target classes, splits and the captioned pre-training pool."""

    seed: int = 0
    n_classes: int = 10
    n_distractors: int = 10
    resolution: int = 32
    shots: int = 10
    val_per_class: int = 50
    test_per_class: int = 50
    pool_size: int = 20000
    p_wrong_label: float = 0.1
    p_no_object: float = 0.1
    p_colour_word: float = 0.0
    version: int = STAGE_VERSIONS["world"]


@dataclass(frozen=True)
class DownloadSpec:
    """img2dataset settings for one pool part."""

    image_size: int = 32
    resize_mode: str = "border"
    timeout: float = 10.0
    retries: int = 0
    encode_format: str = "jpg"
    encode_quality: int = 95
    version: int = STAGE_VERSIONS["download"]


@dataclass(frozen=True)
class ClipSpec:
    """Tiny CLIP architecture and contrastive training schedule (toy world only)."""

    seed: int = 0
    vocab_size: int = 1000
    image_size: int = 32
    vision_widths: tuple[int, ...] = (16, 32, 64, 128)
    text_width: int = 64
    text_layers: int = 2
    heads: int = 4
    embed_dim: int = 64
    max_text_len: int = 16
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    steps: int = 1500
    version: int = STAGE_VERSIONS["pretrain_clip"]


@dataclass(frozen=True)
class DiffusionSpec:
    """Tiny latent diffusion model (toy world only): VAE and UNet sizes and their training schedules."""

    seed: int = 0
    image_size: int = 32
    latent_channels: int = 4
    vae_widths: tuple[int, ...] = (16, 32, 32)
    unet_widths: tuple[int, ...] = (32, 64, 64)
    unet_attention: tuple[bool, ...] = (True, True, False)
    unet_layers_per_block: int = 1
    attention_head_dim: int = 1
    norm_groups: int = 8
    vae_steps: int = 800
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    unet_steps: int = 1500
    unet_batch_size: int = 64
    unet_lr: float = 2e-3
    min_snr_gamma: float = 5.0
    prediction_type: str = "v_prediction"
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    repa_weight: float = 0.0  # representation alignment (REPA): weight of the UNet-mid-block vs CLIP-image-feature loss
    eval_every: int = 0  # UNet steps between fidelity measurements (the learning curve); 0: none
    eval_per_class: int = 20  # images per class of each measurement
    version: int = STAGE_VERSIONS["pretrain_diffusion"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "vae_widths", tuple(self.vae_widths))
        object.__setattr__(self, "unet_widths", tuple(self.unet_widths))
        object.__setattr__(self, "unet_attention", tuple(self.unet_attention))


@dataclass(frozen=True)
class PersonalizeSpec:
    """Per-class personalisation of a diffusion model (see augbench.personalize for the methods)."""

    method: str = "textual_inversion"
    seed: int = 0
    steps: int = 200
    batch_size: int = 4
    lr: float = 5e-3
    dm_finetune: str = "lora"
    dm_lr: float = 1e-4
    lora_rank: int = 4
    cluster_size: int = 5
    resolution: int | None = None
    encode_batch: int = 16  # images per VAE encode call: a class's memory does not grow with its size
    shared_steps: int = 1000  # shared_adapter: steps of the one joint run over every class
    version: int = STAGE_VERSIONS["personalize"]


@dataclass(frozen=True)
class GenerateSpec:
    """Sampling settings of one generation method; `n_images` per class, the rest fixes every pixel."""

    method: str = "prompt_classname"
    seed: int = 0
    n_images: int = 50
    scheduler: str = "dpm"
    steps: int = 20
    guidance_scale: float = 7.5
    batch_size: int = 16
    resolution: int | None = None
    prompt: str = "a photo of a {}."
    negative_prompt: str = ""
    vae_tiling: bool = False  # decode in tiles: flat memory at large sides, may change pixels at the seams
    strength: float = 0.5
    precision: str = "auto"
    store_size: int | None = None  # shorter side of the stored image (the classifier's load_size); None: as generated
    store_format: str = "png"  # png | jpg | webp
    store_quality: int = 95  # jpg / webp quality
    version: int = STAGE_VERSIONS["generate"]


# Settings added after results existed, whose default is what those results were made with: at the default they are
# left out of the spec (and of the generate cache's key), so adding them reruns nothing that exists. Train's mixing
# settings at their defaults are plain training; the judge and the baselines, with no added image, never carry them.
GENERATE_QUIET_DEFAULTS: dict[str, Any] = {"vae_tiling": False}
TRAIN_QUIET_DEFAULTS: dict[str, Any] = {"aug_share": None, "aug_loss_weight": 1.0, "aug_label_smoothing": None}


def quiet_defaults(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`data` without the keys that hold their quiet default (see GENERATE_QUIET_DEFAULTS)."""
    return {k: v for k, v in data.items() if k not in defaults or v != defaults[k]}


@dataclass(frozen=True)
class FilterSpec:
    """Which candidates of an over-generated (or over-fetched) augmentation set a filtered row keeps (augbench.filtering).

    `score`: clip (cosine of the image with its class's prompt "a photo of a {name}.") or classifier (the probability
    that the `real` row's classifier, trained on the real shots alone, gives the image's class). Keep: score at or
    above `threshold`, or the best `top_fraction` of each class's candidates, or (neither) the images the scorer
    assigns to their class (argmax over the classes). `overgenerate`: candidates per class = n_aug x this (with
    `top_fraction`: n_aug / top_fraction).
    """

    score: str = "clip"
    threshold: float | None = None
    top_fraction: float | None = None
    overgenerate: float = 2.0
    version: int = STAGE_VERSIONS["filter"]

    def __post_init__(self) -> None:
        if self.score not in ("clip", "classifier"):
            raise ValueError(f"filter: score {self.score!r} is none of clip, classifier")
        if self.threshold is not None and self.top_fraction is not None:
            raise ValueError("filter: give threshold or top_fraction, not both")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"filter: top_fraction {self.top_fraction} is not in (0, 1]")
        if self.overgenerate < 1:
            raise ValueError(f"filter: overgenerate {self.overgenerate} is below 1 (fewer candidates than n_aug)")


@dataclass(frozen=True)
class EmbedSpec:
    """Batched CLIP embedding of pool shards and target splits."""

    batch_size: int = 256
    precision: str = "fp16"
    version: int = STAGE_VERSIONS["embed"]


@dataclass(frozen=True)
class IndexSpec:
    """A FAISS index built from a factory string, with recall measured against exact search."""

    factory: str = "IVF256,Flat"
    train_size: int = 100000
    nprobe: int = 16
    refine: int = 1
    recall_sample: int = 500
    seed: int = 0
    version: int = STAGE_VERSIONS["index"]


@dataclass(frozen=True)
class RetrieveSpec:
    """Candidates per class from the searched neighbours: de-duplication, leak filtering, over-fetching.

    `n_aug` is the largest number of images a class must end with; `overfetch` times as many
    ranked candidates are kept for fetch, which takes the first `n_aug` that download (dead links);
    """

    mode: str = "image"
    n_aug: int = 50
    overfetch: float = 1.0
    prompts: tuple[str, ...] = ("a photo of a {}.",)
    dedup_threshold: float = 0.995
    leak_threshold: float = 0.95
    leak_hash_distance: int = 6
    leak_match_candidates: int = 5
    leak_pixel_mad: float = 0.075
    version: int = STAGE_VERSIONS["retrieve"]

    def __post_init__(self) -> None:
        if self.mode not in ("image", "text"):
            raise ValueError(f"RetrieveSpec.mode must be 'image' or 'text', got {self.mode!r}")
        object.__setattr__(self, "prompts", tuple(self.prompts))


@dataclass(frozen=True)
class FetchSpec:
    """Turning ranked candidates into images: what counts as a good download, and how many must arrive.

    `min_cosine`: a downloaded image whose CLIP embedding has a cosine under this with the pool's
    stored embedding is `content_changed` (a placeholder, a replaced image); None skips the check
    (local pools, whose pixels are the embedded ones). `min_yield`: a class with fewer than
    `min_yield × n_aug` good images fails the job.
    """

    min_cosine: float | None = 0.85
    min_yield: float = 0.8
    leak_pixel_mad: float = 0.075
    version: int = STAGE_VERSIONS["fetch"]


@dataclass(frozen=True)
class TrainSpec:
    """Classifier recipe: architecture, schedule, augmentation, evaluation, checkpointing.

    The defaults are the paper's kind of recipe (ResNet-50 from scratch, SGD + momentum, warm-up
    and cosine decay, label smoothing, RandomResizedCrop + flip); the toy config overrides the
    sizes. `checkpoint_every` steps a resumable checkpoint is written beside the outputs, so a
    killed job resumes where it stopped and ends with the same weights as an uninterrupted run.
    """

    arch: str = "resnet50"
    input_size: int = 224
    load_size: int | None = None  # images are decoded to this square size (None: input_size); eval centre-crops input_size
    small_input_stem: bool = False
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup_epochs: int = 1
    augment: str = "rrc"  # rrc: RandomResizedCrop + flip; shift_flip: small translations + flip
    crop_scale: tuple[float, float] = (0.08, 1.0)
    colour_invariance: bool = False  # random channel permutation, inversion and greyscale per image (toy world)
    amp: bool = True  # bfloat16 autocast, on a GPU only
    channels_last: bool = True  # on a GPU only (it slows small inputs on the CPU)
    deterministic: bool = False
    checkpoint_every: int = 200
    min_steps: int = 200
    # rows shuffled together: a training set larger than this is read in contiguous blocks shuffled within a buffer of
    # this size (augbench.classify.epoch_order); a smaller one in a plain random order
    shuffle_buffer_mb: int = 2048
    # how real and added images mix (Diff-Mix's synthetic share of each batch, DataDream's loss weight); the defaults
    # are plain training on the union, as before these settings existed
    aug_share: float | None = None  # share of added images in every batch; None: their share of the training set
    aug_loss_weight: float = 1.0  # an added image's weight in the batch's mean loss (a real image's is 1)
    aug_label_smoothing: float | None = None  # label smoothing of added images; None: label_smoothing, as real ones
    version: int = STAGE_VERSIONS["train"]

    def __post_init__(self) -> None:
        if self.augment not in ("rrc", "shift_flip"):
            raise ValueError(f"TrainSpec.augment must be 'rrc' or 'shift_flip', got {self.augment!r}")
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))
        if self.aug_share is not None and not 0 <= self.aug_share <= 1:
            raise ValueError(f"TrainSpec.aug_share must be in [0, 1] or null, got {self.aug_share!r}")
