"""What a method is: the one registry of the results table's rows. Plain data: the workflow imports it at parse time.

Every place that treats methods differently (the rules that plan a method's jobs, the specs its jobs get, the
personalisation and generation code, the report's cost attribution) asks this table about a method's
*properties*, never its name. Adding a method is one `Method(...)` row in `REGISTRY` plus, where its
properties are new, the code for them; a row that combines existing properties needs nothing else
(docs/methods.md, "Adding a method").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

Family = Literal["baseline", "retrieval", "generated"]
Learns = Literal["nothing", "pseudo_word", "cond_vectors", "cond_clusters"]
Prompt = Literal["classname", "templates", "learned"]


@dataclass(frozen=True)
class Method:
    """One row of the results table and what its images are made of.

    family: baseline (real images only), retrieval (nearest pool images) or generated (a diffusion model's).
    real_splits: the real tables the classifier trains on besides the added images.
    retrieval_mode: retrieval only: the queries are the class's training images ("image") or its prompts ("text").
    prompt: generated only: the class name in `generate.prompt`, the 80 ImageNet templates, or what was learned.
    learns: what personalisation learns per class: nothing, a pseudo-word (textual inversion), conditioning vectors
        (one per training image), or one per cluster of training images (k-means on their CLIP embeddings).
    finetune_unet: the denoiser is fine-tuned (LoRA or full, `personalize.dm_finetune`) with what is learned.
    from_real: generation starts from the class's real images (img2img, at `generate.strength`).
    shared: one personalisation for the whole dataset, not one per class: one adapter on the denoiser trained jointly
        with every class's pseudo-word (Diff-Mix, DataDream), for `personalize.shared_steps` steps.
    generate: settings of the generate section this method fixes for itself (e.g. another strength).
    """

    name: str
    family: Family
    real_splits: tuple[str, ...] = ("train",)
    retrieval_mode: Literal["image", "text"] | None = None
    prompt: Prompt | None = None
    learns: Learns = "nothing"
    finetune_unet: bool = False
    from_real: bool = False
    shared: bool = False
    generate: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if (self.family == "retrieval") != (self.retrieval_mode is not None):
            raise ValueError(f"method {self.name}: retrieval_mode is for (and required by) the retrieval family")
        if (self.family == "generated") != (self.prompt is not None):
            raise ValueError(f"method {self.name}: prompt is for (and required by) the generated family")
        if (self.prompt == "learned") != (self.learns != "nothing"):
            raise ValueError(f"method {self.name}: a learned prompt goes with something learned, and only then")
        if self.finetune_unet and self.learns == "nothing":
            raise ValueError(f"method {self.name}: finetune_unet needs something learned with it")
        if self.shared and not (self.finetune_unet and self.learns == "pseudo_word"):
            raise ValueError(f"method {self.name}: a shared adapter trains the denoiser with one pseudo-word per class")
        object.__setattr__(self, "generate", MappingProxyType(dict(self.generate)))

    @property
    def personalized(self) -> bool:
        """Whether a per-class personalisation job runs before generation."""
        return self.learns != "nothing"

    @property
    def sections(self) -> tuple[str, ...]:
        """The config sections the method's own jobs read (besides `train`, which every row reads)."""
        return {"baseline": (), "retrieval": ("retrieve", "fetch")}[self.family] if self.family != "generated" else (
            ("personalize", "generate") if self.personalized else ("generate",))

    def unused_keys(self, section: str) -> frozenset[str]:
        """Keys of `section` this method's spec leaves out: changing them reruns none of its jobs."""
        if section == "personalize":
            unused = set() if self.finetune_unet else {"dm_finetune", "dm_lr", "lora_rank"}
            unused |= {"steps"} if self.shared else {"shared_steps"}
            return frozenset(unused | (set() if self.learns == "cond_clusters" else {"cluster_size"}))
        if section == "generate":
            unused = set() if self.from_real else {"strength"}
            return frozenset(unused | (set() if self.prompt == "classname" else {"prompt"}))
        return frozenset()


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("real", "baseline"),
    Method("real_x2", "baseline", real_splits=("train", "train_extra")),
    Method("retrieval_image", "retrieval", retrieval_mode="image"),
    Method("retrieval_text", "retrieval", retrieval_mode="text"),
    Method("prompt_classname", "generated", prompt="classname"),
    Method("prompt_templates", "generated", prompt="templates"),
    Method("img2img", "generated", prompt="classname", from_real=True),
    Method("textual_inversion", "generated", prompt="learned", learns="pseudo_word"),
    Method("cond_vectors", "generated", prompt="learned", learns="cond_vectors"),
    Method("cond_clusters", "generated", prompt="learned", learns="cond_clusters"),
    Method("textual_inversion_dm", "generated", prompt="learned", learns="pseudo_word", finetune_unet=True),
    Method("cond_vectors_dm", "generated", prompt="learned", learns="cond_vectors", finetune_unet=True),
    Method("shared_adapter", "generated", prompt="learned", learns="pseudo_word", finetune_unet=True, shared=True),
)}


ROW_SEPARATOR = "@"  # a results row of a generated method on one generator: `<method>@<generator variant>`
GUIDANCE_SEPARATOR = "-g"  # a generator's variant at one of several guidance scales: `<generator>-g<scale>`


FILTER_SEPARATOR = "+"  # a filtered row: `<row>+<filter>` keeps what the filter keeps of `<row>`'s candidates


def filter_of(row: str) -> str:
    """The filter of a row `<row>+<filter>` ("" for an unfiltered row)."""
    return row.split(FILTER_SEPARATOR, 1)[1] if FILTER_SEPARATOR in row else ""


def unfiltered(row: str) -> str:
    """The row a filtered row `<row>+<filter>` filters (an unfiltered row itself)."""
    return row.split(FILTER_SEPARATOR, 1)[0]


def variant_name(generator: str, scale: float, several: bool) -> str:
    """The variant of `generator` at guidance `scale`: the generator's name, with `-g<scale>` where it has several."""
    return f"{generator}{GUIDANCE_SEPARATOR}{scale:g}" if several else generator


def generator_name(row: str) -> str:
    """The generator a row `<method>@<generator>[-g<scale>]` runs on ("" for a row without one). Generator names hold
    only letters, digits, _ and . (checked at parse time), so the first `-g` starts the guidance."""
    row = unfiltered(row)
    return row.split(ROW_SEPARATOR, 1)[1].split(GUIDANCE_SEPARATOR, 1)[0] if ROW_SEPARATOR in row else ""


def method(name: str) -> Method:
    """The registry row of `name`, a method or a results row `<method>@<generator variant>[+<filter>]`
    (docs/generators.md); an unknown name is an error that lists the known ones."""
    try:
        return REGISTRY[unfiltered(name).split(ROW_SEPARATOR, 1)[0]]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {list(REGISTRY)}") from None


def row_name(base: str, variant: str) -> str:
    """The results row of method `base` on generator variant `variant` ("": the run's one diffusion model, whose rows
    keep the method's own name)."""
    return f"{base}{ROW_SEPARATOR}{variant}" if variant else base


def row_pattern(methods: tuple[str, ...], filtered: bool | None = None) -> str:
    """A wildcard constraint for the rows of `methods`: the method, optionally on a generator variant, optionally
    filtered (`filtered`: True only filtered rows, False only unfiltered ones, None both)."""
    tail = {None: r"(?:\+[A-Za-z0-9_]+)?", True: r"\+[A-Za-z0-9_]+", False: ""}[filtered]
    return f"(?:{'|'.join(methods)})(?:{ROW_SEPARATOR}[A-Za-z0-9_.-]+)?{tail}"


def names(**props: object) -> tuple[str, ...]:
    """The methods whose properties equal `props`, in registry order (e.g. names(family="generated"))."""
    return tuple(m.name for m in REGISTRY.values() if all(getattr(m, k) == v for k, v in props.items()))


# Views for rules and wildcard constraints (derived: never edit these, edit REGISTRY)
ALL_METHODS = tuple(REGISTRY)
BASELINES = names(family="baseline")
RETRIEVAL_MODES = {m.name: m.retrieval_mode for m in REGISTRY.values() if m.family == "retrieval"}
GENERATION_METHODS = names(family="generated")
PERSONALIZED = tuple(m.name for m in REGISTRY.values() if m.personalized)
