# Config validation, specs and input functions: the only Python in the workflow.
import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from augbench.architectures import check_pairs  # noqa: E402
from augbench.architectures import resolve as resolve_architecture  # noqa: E402
from augbench.methods import ALL_METHODS, BASELINES, GENERATION_METHODS, PERSONALIZED, REGISTRY, RETRIEVAL_MODES  # noqa: E402
from augbench.methods import FILTER_SEPARATOR, ROW_SEPARATOR, filter_of, row_name, row_pattern, unfiltered, variant_name  # noqa: E402
from augbench.filtering import candidates as filter_candidates  # noqa: E402
from augbench.methods import method as method_of  # noqa: E402
from augbench.specs import GENERATE_QUIET_DEFAULTS, STAGE_VERSIONS, TRAIN_QUIET_DEFAULTS, DiffusionSpec, FilterSpec, WorldSpec, canonical_json  # noqa: E402
from augbench.specs import parse_spec, quiet_defaults, spec_dict  # noqa: E402
from augbench.hub import MARKER as HUB_MARKER  # noqa: E402
from augbench.hub import snapshot_folder  # noqa: E402
from augbench.plan import generate_minutes, personalize_minutes, pipeline_host_mb, train_minutes  # noqa: E402
from augbench.pool import list_parts, part_shape  # noqa: E402
from augbench.target import TargetSpec, target_classes  # noqa: E402

validate(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml")

R = f"results/{config['dataset']}"
LOGS = f"logs/{config['dataset']}"
BENCH = f"benchmarks/{config['dataset']}"
TOY_TARGET = config["target"]["source"] == "toy"
# split tables and classes.json: under the toy world's folder, or (a real target) a folder of their own, so a real run
# writes nothing under world/
DATA = f"{R}/world" if TOY_TARGET else f"{R}/dataset"
PRECOMPUTED = config["pool"]["embeddings"]  # a clip-retrieval folder (img_emb/*.npy + metadata/*.parquet) or None
TOY = config["pool"]["urls"] is None and PRECOMPUTED is None  # the toy pool, served from the world on 127.0.0.1
# the judge also learns pool images by their hidden true kind: only where that truth exists (a toy pool and target)
JUDGE_POOL = config["report"]["judge"] and TOY and TOY_TARGET
PARTS = [f"{i:05d}" for i in range(config["pool"]["parts"])]
SPLITS = ["train", "train_extra", "val", "test"]
HUB_CACHE = config["models"]["cache"]
# cuda: GPU rules fail without a usable GPU; auto: they run on the CPU when there is none (and say so); cpu: always
DEVICE = config["device"]


def model_source(section, toy_folder, name=None, revision=None):
    """(folder the jobs load, the file that makes it, or None) for the clip / diffusion model, or (name, revision
    given) a generator's model (`section` then names it in messages).

    "toy": the workflow trains it; an existing folder: used as it is; anything else is a hub id, fetched once by the
    local rule fetch_model into the model cache at the configured revision. On an offline machine
    (HF_HUB_OFFLINE=1) a hub model missing from the cache stops the run here, naming the command that fetches it.
    """
    if name is None:
        name, revision = config[section]["model"], config[section]["revision"]
    if name == "toy":
        return toy_folder, toy_folder
    if Path(name).exists() or os.path.isabs(name) or name.startswith("."):
        return name, None
    folder = str(snapshot_folder(HUB_CACHE, name, revision))
    marker = f"{folder}/{HUB_MARKER}"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") and not Path(marker).exists():
        config_error(f"{section}.model {name!r} (revision {revision or 'main'}) is not in the model cache "
                     f"{HUB_CACHE!r} and HF_HUB_OFFLINE is set; fetch it once on a machine with internet: "
                     f"snakemake --cores 1 --configfile <your config> {marker}")
    return folder, marker


def config_error(message):
    """Stop at parse time, before any job, with a message that names the config key."""
    raise WorkflowError(f"config: {message}")


CLIP_MODEL, CLIP_FILE = model_source("clip", f"{R}/clip/model")
# with `generators`, diffusion.model is not used (each generator names its model): not resolved, not fetched
SD_MODEL, SD_FILE = (None, None) if config.get("generators") else model_source("diffusion", f"{R}/diffusion/model")
if TOY_TARGET:  # shipped toy models (models/toy/manifest.json) trained on another world: say so, do not stop
    from augbench.toy.ship import world_differences

    for _section, _folder in (("clip", CLIP_MODEL), ("diffusion", SD_MODEL or f"{R}/diffusion/model")):
        _diff = world_differences(_folder, parse_spec(WorldSpec, dict(config["world"])).__dict__)
        if _diff:
            print(f"augbench: warning: {_section}.model {_folder} was trained on another world ({'; '.join(_diff)}); "
                  "retrieval and generation may be weaker (README: toy foundation models)", file=sys.stderr)


for _key in ("methods", "sweep_methods"):  # the registry is the one list of methods (augbench.methods.REGISTRY)
    _unknown = [m for m in (config.get(_key) or []) if m not in ALL_METHODS]
    if _unknown:
        config_error(f"{_key} names {_unknown}, which are no methods; known: {list(ALL_METHODS)}")


def model_architecture(folder, declared, toy, key):
    """A generator's architecture where it is known at parse time: declared, or read from an existing folder (a
    workflow-trained toy model is a Stable Diffusion pipeline); None for a hub model not yet fetched under `auto`
    (then checked when loaded). Every configured generated method is checked against it here, before any job."""
    if toy and declared == "auto":
        declared = "sd"
    if declared == "auto" and not Path(folder).is_dir():
        return None
    try:
        arch = resolve_architecture(folder, declared)
        methods = [m for m in dict.fromkeys(config["methods"] + list(config.get("sweep_methods") or []))
                   if m in GENERATION_METHODS]
        check_pairs(methods, arch, key, config["personalize"]["dm_finetune"])
    except ValueError as exc:
        config_error(f"{key}: {exc}")
    return arch


def generator_variants():
    """The generator axis: variant -> what its rows generate with (generator name, model folder, the file that makes
    it, declared architecture, guidance scale, and the generate options it sets). No `generators`: one variant "",
    diffusion.model with the generate section, and rows keep the methods' names (as before the axis existed)."""
    gens = config.get("generators") or {}
    if not gens:
        return {"": {"generator": "diffusion", "model": SD_MODEL, "file": SD_FILE,
                     "architecture": config["diffusion"]["architecture"],
                     "guidance": config["generate"]["guidance_scale"], "options": {}}}
    out = {}
    for name, g in gens.items():
        if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            config_error(f"generators: the name {name!r} may hold only letters, digits, _ and . (it is part of paths)")
        folder, made_by = model_source(f"generators.{name}", f"{R}/diffusion/model", g["model"], g.get("revision"))
        model_architecture(folder, g.get("architecture", "auto"), g["model"] == "toy", f"generators.{name}")
        scales = g.get("guidance_scale", config["generate"]["guidance_scale"])
        scales = scales if isinstance(scales, list) else [scales]
        options = {k: v for k, v in g.items() if k not in ("model", "revision", "architecture", "guidance_scale")}
        for scale in scales:
            variant = variant_name(name, scale, len(scales) > 1)
            out[variant] = {"generator": name, "model": folder, "file": made_by,
                            "architecture": g.get("architecture", "auto"), "guidance": scale,
                            "options": {**options, "guidance_scale": scale}}
    return out


if not config.get("generators"):
    model_architecture(SD_MODEL, config["diffusion"]["architecture"], config["diffusion"]["model"] == "toy",
                       "diffusion.model")
GENERATORS = generator_variants()


def rows_of(m):
    """The results rows of method `m`: one per generator variant for a generated method, else the method itself."""
    return [row_name(m, v) for v in GENERATORS] if m in GENERATION_METHODS else [m]


def filter_specs():
    """The configured filters (name -> FilterSpec) and the methods each applies to, checked before any job."""
    specs, applies = {}, {}
    for name, f in (config.get("filters") or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            config_error(f"filters: the name {name!r} may hold only letters, digits and _ (it is part of paths)")
        try:
            specs[name] = parse_spec(FilterSpec, {k: v for k, v in f.items() if k != "methods"})
        except ValueError as exc:
            config_error(f"filters.{name}: {exc}")
        wanted = f.get("methods")
        augmenting = [m for m in config["methods"] if m not in BASELINES]
        bad = [m for m in (wanted or []) if m not in augmenting]
        if bad:
            config_error(f"filters.{name}.methods names {bad}, which are no augmenting methods of `methods` "
                         f"({augmenting})")
        applies[name] = wanted if wanted is not None else augmenting
    return specs, applies


FILTERS, FILTERED_METHODS = filter_specs()
ROWS = [r for m in config["methods"] for r in rows_of(m)]
# a filtered row `<row>+<filter>` beside each row of a method its filter applies to
ROWS += [f"{r}{FILTER_SEPARATOR}{f}" for f in FILTERS for m in FILTERED_METHODS[f] for r in rows_of(m)]
GENERATED = [r for r in ROWS if method_of(r).family == "generated"]
FILTERED = [r for r in ROWS if filter_of(r)]


def candidates_of(row):
    """Images per class a row's generate or fetch jobs make: the largest n_aug, or a filtered row's candidates."""
    f = filter_of(row)
    return filter_candidates(FILTERS[f], max(N_AUG)) if f else max(N_AUG)


def generator_of(row):
    """The generator variant of a results row (a generated method's), or of a personalisation job's
    `<method>@<generator>` (the first variant of that generator: its model, file and architecture)."""
    row = unfiltered(row)
    suffix = row.split(ROW_SEPARATOR, 1)[1] if ROW_SEPARATOR in row else ""
    if suffix in GENERATORS:
        return GENERATORS[suffix]
    return next(g for g in GENERATORS.values() if g["generator"] == suffix)


def personalization_of(row):
    """The personalisation a generated row reads: one per (method, generator), shared by the generator's guidance
    variants (guidance changes only sampling)."""
    base, gen = method_of(row).name, generator_of(row)["generator"]
    return row_name(base, gen if config.get("generators") else "")


if config["report"]["gpu"] and DEVICE != "cuda":
    config_error("report.gpu books the GPU rules' time as GPU-hours: set device: cuda, so that a GPU rule without a "
                 "usable GPU fails instead of running on the CPU")
if TOY and not TOY_TARGET:
    config_error("the toy pool (pool.urls and pool.embeddings both null) exists only with target.source: toy")
if PRECOMPUTED and "toy" in (config["clip"]["model"], config["diffusion"]["model"]):
    config_error("pool.embeddings (precomputed) leaves no pool images to train a toy CLIP or diffusion model on; "
                 "name real models in clip.model / diffusion.model")
if PRECOMPUTED and config["pool"]["urls"]:
    config_error("give either pool.urls (download and embed) or pool.embeddings (precomputed), not both")


POOL_LAYOUT = config["pool"]["layout"]
if PRECOMPUTED:
    try:
        _parts = list_parts(PRECOMPUTED, POOL_LAYOUT, config["pool"]["embedding_key"])
    except ValueError as exc:
        config_error(f"pool.embeddings: {exc}")
    POOL_EMB = [str(p.emb) for p in _parts]
    POOL_META = [str(p.meta) for p in _parts]
    POOL_NAMES = [p.name for p in _parts]
else:  # the workflow's own pool embeddings, written in clip-retrieval's naming
    POOL_LAYOUT = "clip_retrieval"
    POOL_EMB = expand(f"{R}/embed/pool/img_emb/img_emb_{{part}}.npy", part=PARTS)
    POOL_META = expand(f"{R}/embed/pool/metadata/metadata_{{part}}.parquet", part=PARTS)
    POOL_NAMES = [str(int(p)) for p in PARTS]
# Local pool images: the leak filter verifies suspects by pixels, and retrieved images are copied from them.
POOL_SHARDS = [] if PRECOMPUTED else expand(f"{R}/pool/shards/{{part}}.tar", part=PARTS)
PARTS_PER_BLOCK = config["retrieve"]["parts_per_block"]
BLOCKS = [f"{b:05d}" for b in range((len(POOL_EMB) + PARTS_PER_BLOCK - 1) // PARTS_PER_BLOCK)]


def pool_args(first=0, last=None):
    """The pool parts [first, last) as command-line arguments (files, names, layout)."""
    sl = slice(first, last)
    q = lambda xs: " ".join(map(shlex.quote, xs))  # noqa: E731
    return (f"--pool-emb {q(POOL_EMB[sl])} --pool-meta {q(POOL_META[sl])} --pool-names {q(POOL_NAMES[sl])}"
            f" --pool-layout {POOL_LAYOUT} --embedding-key {config['pool']['embedding_key']} --first-part {first}")


def pool_dim():
    """Embedding width, for memory estimates: read from a precomputed part's header, else the toy CLIP's or ViT-L/14's."""
    if PRECOMPUTED:
        return part_shape(_parts[0])[1]
    return int(config["clip"].get("train", {}).get("embed_dim", 64)) if config["clip"]["model"] == "toy" else 768


def overfetch():
    """Ranked candidates per class = n_aug x this: remote pools lose links, local ones do not."""
    value = config["fetch"]["overfetch"]
    return value if value is not None else (1.0 if POOL_SHARDS else 2.0)


def target_spec():
    """The real target dataset's spec (config section `target` without `source`)."""
    return parse_spec(TargetSpec, {k: v for k, v in config["target"].items() if k != "source"})


def dataset_classes():
    """(key, name) of each target class in label order: known before any job runs, so per-class jobs fan out."""
    if not TOY_TARGET:
        try:
            return target_classes(target_spec())
        except (FileNotFoundError, ValueError) as exc:
            config_error(str(exc))
    from augbench.toy.world import world_kinds  # the toy code only where the toy world is used

    spec = parse_spec(WorldSpec, {k: v for k, v in config["world"].items()})
    return [(k.key, k.nouns[0]) for k in world_kinds(spec)[: spec.n_classes]]


def resolve_n_aug(value):
    """Augmentation images per class: an integer, or a multiple of the real images per class ("2x")."""
    if isinstance(value, int):
        return value
    per_class = config.get("real_per_class") or (config["world"]["shots"] if TOY_TARGET else None)
    if per_class is None:
        config_error(f"n_aug {value!r} is a multiple of the real images per class: set real_per_class")
    n = round(float(value[:-1]) * per_class)
    if n < 1:  # "0x" or a multiple that rounds to no image: an error, not a silent 1
        config_error(f"n_aug {value!r} means {value[:-1]} x {per_class} real images per class = {n} augmentation images; "
                     "give at least one")
    return n


N_AUG = sorted({resolve_n_aug(v) for v in config["n_aug"]})


CLASSES = dataset_classes()
CLASS_KEYS = [k for k, _ in CLASSES]
CLASS_LABEL = {k: i for i, (k, _) in enumerate(CLASSES)}
CLASS_NAME = dict(CLASSES)
# Personalisation and generation run one process per (method, block of classes): the model is loaded once per
# block, not once per class (13,000 loads of Stable Diffusion for ImageNet's per-class jobs).
GPU_SEARCH = bool(config["retrieve"]["gpu"])  # search and merge on a GPU: rules search_block_gpu, retrieve_gpu
CLASS_BLOCKS = [CLASS_KEYS[i:i + config["class_block"]] for i in range(0, len(CLASS_KEYS), config["class_block"])]


wildcard_constraints:
    part=r"\d{5}",
    split="|".join(SPLITS),
    mode="image|text",
    # a method, or a generated method on a generator variant; either filtered (`filters`)
    method=r"[a-z0-9_]+(?:@[A-Za-z0-9_.-]+)?(?:\+[A-Za-z0-9_]+)?",
    n_aug=r"\d+",
    seed=r"\d+",
    cls=r"[A-Za-z0-9_.-]+",


SEARCH_SCHEDULING = ("search", "parts_per_block", "tile_rows", "threads", "gpu", "margin")




def stage_spec(stage, **extra):
    """One canonical JSON string of a stage's settings plus its version: a changed setting reruns the stage."""
    section = {"world": "world", "download": "download", "embed": "embed", "index": "index", "train": "train",
               "personalize": "personalize", "generate": "generate"}.get(stage)
    data = dict(config[section]) if section else {}
    if stage == "pretrain_clip":
        data = dict(config["clip"]["train"])
    if stage == "pretrain_diffusion":
        data = dict(config["diffusion"]["train"])
    if stage == "target":
        data = {k: v for k, v in config["target"].items() if k != "source"}
    # how many threads or processes a job uses changes no result: never part of a spec (the rules pass --threads)
    for key in ("threads", "processes_count", "thread_count"):
        data.pop(key, None)
    row = extra.get("method", "")
    if stage in ("personalize", "generate"):
        # a row on a generator: the method's own name in the spec (the same seeds on every generator), the
        # generator's options over the generate section
        extra["method"] = method_of(row).name
        if stage == "generate":
            data.update(generator_of(row)["options"])
        # drop what this method does not use, and the memory options (the rules pass them): changing them reruns nothing
        data = {k: v for k, v in data.items() if k not in method_of(row).unused_keys(stage) and k not in MEMORY_OPTIONS}
    if stage == "generate":
        data["n_images"] = candidates_of(row)  # a filtered row's candidates: its row's images and more
        data.update(method_of(row).generate)  # settings the method fixes for itself (registry)
        data = quiet_defaults(data, GENERATE_QUIET_DEFAULTS)  # at their defaults, later settings rerun nothing
    if stage == "retrieve":  # content only: how the search is scheduled (blocks, tiles, threads, device) is not
        data = {k: v for k, v in config["retrieve"].items() if k not in SEARCH_SCHEDULING
                and not (extra.get("mode") == "image" and k == "prompts")}
        data.update(n_aug=retrieval_n(extra.get("mode")), overfetch=overfetch())
    if stage == "search":
        data = {"n_aug": retrieval_n(), "overfetch": overfetch(), "margin": config["retrieve"]["margin"]}
    if stage == "fetch":
        data = {k: v for k, v in config["fetch"].items() if k in ("min_yield", "min_cosine")}
        data["leak_pixel_mad"] = config["retrieve"]["leak_pixel_mad"]
        if POOL_SHARDS:
            data["min_cosine"] = None  # a local pool's pixels are the embedded ones
    if stage == "index":
        data = {k: v for k, v in config["index"].items() if k != "threads"}  # threads: scheduling
    if stage == "train":  # mixing options at their defaults are plain training, as before they existed: no rerun;
        # the judge and the baselines train on no added image, so they are never part of their spec
        no_added = extra.pop("no_added_images", False)
        data = quiet_defaults(data, TRAIN_QUIET_DEFAULTS)
        data = {k: v for k, v in data.items() if not (no_added and k in TRAIN_QUIET_DEFAULTS)}
    data.update(extra)
    data["version"] = STAGE_VERSIONS[stage]
    return canonical_json(data)


def retrieval_n(mode=None):
    """Images per class the retrieval rows (of one query mode, or of both) fetch: the largest n_aug, or a filtered
    retrieval row's candidates (the merge then ranks n_aug x overfetch of those per class)."""
    rows = [r for r in ROWS if method_of(r).family == "retrieval" and (mode is None or method_of(r).retrieval_mode == mode)]
    return max([candidates_of(r) for r in rows] or [max(N_AUG)])


def clip_input():
    """The toy CLIP folder and a hub model's cache marker are workflow outputs; a local folder is not an input file."""
    return {"model": CLIP_FILE} if CLIP_FILE else {}


def n_aug_values(method):
    """Baselines have no augmentation images (n_aug 0); `sweep_methods` (if set) limits the sweep to those methods.

    A method outside `sweep_methods` runs at the largest n_aug only, the value of the main table.
    """
    if method in BASELINES:
        return [0]
    sweep = config.get("sweep_methods")
    return N_AUG if sweep is None or method_of(method).name in sweep else [max(N_AUG)]


def train_runs():
    """Every (row, n_aug, seed) of the run: a row is a method, or a generated method on one generator variant."""
    return [(m, n, s) for m in ROWS for n in n_aug_values(m) for s in config["seeds"]]


def augment_inputs(wildcards):
    """The augmentation set a training run reads (none for the baselines)."""
    if wildcards.method in BASELINES:
        return {}
    return {"aug_manifest": f"{R}/decoded/augment/{wildcards.method}"}  # the set decoded once, memory-mapped


DECODE_SIZE = config["train"].get("load_size") or config["train"]["input_size"]


def block_mem_mb(wildcards, attempt):
    """A personalize / generate block: the pipeline loaded once (its fp32 weights in host memory: ~6 GB for Stable
    Diffusion, 68 GB for FLUX.1; augbench.plan.pipeline_host_mb), one class's decoded images at a time."""
    side = config["generate"].get("resolution") or 512
    images = 2 * max(1, config.get("real_per_class") or 130) * side * side * 3  # a class's images and mirrors, uint8
    return int((pipeline_host_mb(config, wildcards.method) + images / 1e6) * attempt)


def personalize_runtime(wildcards, attempt):
    """Minutes a personalize block asks for: its classes x steps at the GPU rate of its method kind, the GPU shared
    `gpu_share` ways, with margin (augbench.plan, where the rates and their sources live)."""
    shared = method_of(wildcards.method).shared  # one job over every class
    classes = len(CLASS_KEYS) if shared else len(CLASS_BLOCKS[int(wildcards.block)])
    return personalize_minutes(config, wildcards.method, classes) * attempt


def generate_runtime(wildcards, attempt):
    """Minutes a generate block asks for: its classes x the images it makes (the largest n_aug, or a filtered row's
    candidates) at the GPU rate (augbench.plan)."""
    n = candidates_of(wildcards.method)
    return generate_minutes(config, wildcards.method, len(CLASS_BLOCKS[int(wildcards.block)]), n) * attempt


def train_runtime(wildcards, attempt):
    """Minutes a training run asks for: (real + added images) x epochs at the GPU rate (augbench.plan)."""
    real = len(CLASS_KEYS) * (config.get("real_per_class") or 130) * len(method_of(wildcards.method).real_splits)
    return train_minutes(config, real + len(CLASS_KEYS) * int(wildcards.n_aug)) * attempt


def collect_mem_mb(wildcards, attempt):
    """collect_generated: libraries and CLIP, the method's manifests (pointers) and 256 decoded images."""
    rows = len(CLASS_KEYS) * max(N_AUG) * 300  # bytes per manifest row, generously
    return int((4000 + rows / 1e6) * attempt)


def train_mem_mb(wildcards, attempt):
    """A training run's own memory: libraries and the model (about 3 GB with CUDA), plus a few prefetched batches.
    The decoded images are memory-mapped (page cache, shared by every run on the node), so they are not counted."""
    batch = config["train"]["batch_size"] * DECODE_SIZE * DECODE_SIZE * 3 * 4  # uint8 + float copies, two in flight
    return int((3000 + 4 * batch / 1e6) * attempt)


def real_splits(wildcards):
    """The decoded real splits a method trains on (registry: real_x2 adds as many real images again, the upper bound)."""
    return [f"{R}/decoded/{s}" for s in method_of(wildcards.method).real_splits]


def model_input(wildcards):
    """The row's generator: the toy diffusion pipeline folder and a hub model's cache marker are workflow outputs; a
    local folder is not."""
    made_by = generator_of(wildcards.method)["file"]
    return {"model": made_by} if made_by else {}


def personalize_inputs(wildcards):
    """What personalising a block reads: the model, the real training table, and CLIP embeddings for clusters."""
    inputs = {**model_input(wildcards), "table": f"{DATA}/target/train.parquet", "classes": f"{DATA}/classes.json"}
    if method_of(wildcards.method).learns == "cond_clusters":  # k-means on the training images' CLIP embeddings
        inputs["emb"] = f"{R}/embed/target/img_emb/train.npy"
        inputs["meta"] = f"{R}/embed/target/metadata/train.parquet"
    return inputs


def generate_inputs(wildcards):
    """What generating a block reads: the model, the block's personalisation folder, the real images (img2img)."""
    inputs = {**model_input(wildcards), "table": f"{DATA}/target/train.parquet", "classes": f"{DATA}/classes.json"}
    if method_of(wildcards.method).personalized:  # a shared adapter: one personalisation job over every class
        block = "0000" if method_of(wildcards.method).shared else wildcards.block
        inputs["personalization"] = f"{R}/personalize/{personalization_of(wildcards.method)}/block_{block}"
    base = unfiltered(wildcards.method)
    if base != wildcards.method and base in ROWS:  # after its row's block, whose chunks it reuses (one cache)
        inputs["row_block"] = f"{R}/generate/{base}/block_{wildcards.block}"
    return inputs


def class_args(wildcards):
    """The block's class keys, as command-line arguments (labels and display names come from classes.json)."""
    return "--keys " + " ".join(CLASS_BLOCKS[int(wildcards.block)])


def generated_files(method, name):
    """Every class's `name` (manifest.parquet) of a generated method, in class order, inside its blocks."""
    return [f"{R}/generate/{method}/block_{b:04d}/{k}/{name}" for b, keys in enumerate(CLASS_BLOCKS) for k in keys]


def generated_blocks(method):
    """The block folders of a generated method (the generate jobs' outputs)."""
    return [f"{R}/generate/{method}/block_{b:04d}" for b in range(len(CLASS_BLOCKS))]


# Per-class rules take their input-dependent arguments from one function and their spec from a second,
# `method_spec` (Snakemake records and compares only params that depend on the wildcards alone); Snakemake
# inspects every callable param of every job, so ImageNet's 13,000 per-class jobs get two, and the spec
# string is built once per (stage, method), not once per job.
METHOD_SPECS = {}


def method_spec(stage):
    """A params function: the stage's canonical spec for the job's method, computed once per method."""

    def spec(wildcards):
        key = (stage, wildcards.method)
        if key not in METHOD_SPECS:
            METHOD_SPECS[key] = stage_spec(stage, method=wildcards.method)
        return METHOD_SPECS[key]

    return spec


MEMORY_OPTIONS = ("gradient_checkpointing", "offload")  # trade memory for time, change no result: arguments, not specs


def personalize_args(wildcards, input):
    """Classes, per-class cache and optional CLIP embeddings (cond_clusters) of one personalize job (the spec is its
    own param)."""
    emb = f" --emb {shlex.quote(input.emb)} --meta {shlex.quote(input.meta)}" if "emb" in input.keys() else ""
    cache = f"{R}/personalize/{wildcards.method}/cache"
    arch = generator_of(wildcards.method)["architecture"]  # checks the folder only: an argument, not a compared param
    checkpointing = " --gradient-checkpointing" if config["personalize"]["gradient_checkpointing"] else ""
    keys = "--keys " + " ".join(CLASS_KEYS) if method_of(wildcards.method).shared else class_args(wildcards)
    return f"{keys}{emb} --cache {shlex.quote(cache)} --architecture {arch}{checkpointing}"


def generate_args(wildcards, input):
    """Classes, personalisation folder (personalised methods) and chunk cache of one generate job (the spec is its
    own param)."""
    pers = f" --personalization {shlex.quote(input.personalization)}" if "personalization" in input.keys() else ""
    cache = f"{R}/generate/{unfiltered(wildcards.method)}/cache"  # a filtered row's candidates extend its row's chunks
    # the declared architecture only checks the folder (no pixel depends on it): an argument, not a compared param
    arch = generator_of(wildcards.method)["architecture"]
    offload = generator_of(wildcards.method)["options"].get("offload", config["generate"]["offload"])
    return f"{class_args(wildcards)}{pers} --cache {shlex.quote(cache)} --architecture {arch} --offload {offload}"


AUGMENTED = [m for m in ROWS if m not in BASELINES]


def retrieval_rows():
    """The retrieval rows of the table, filtered ones included (each with its fetch's stats)."""
    return [m for m in ROWS if method_of(m).family == "retrieval"]


def report_inputs():
    """Metrics of every run, the augmentation sets (grids, retrieval precision, leaks, fidelity) and the real images."""
    runs = [f"{R}/train/{m}/{n}/{s}/metrics.json" for m, n, s in train_runs()]
    retrieval = retrieval_rows()
    return {
        "metrics": runs,
        "manifests": [f"{R}/augment/{m}/manifest.parquet" for m in AUGMENTED],
        "stats": [f"{R}/retrieve/{method_of(m).retrieval_mode}/stats.json" for m in retrieval],
        "fetch_stats": [f"{R}/augment/{m}/{'candidates/' if filter_of(m) else ''}fetch_stats.json" for m in retrieval],
        "filters": [f"{R}/augment/{m}/filter.json" for m in FILTERED],
        "fidelity": [f"{R}/augment/{m}/fidelity.json" for m in GENERATED],
        "judged": [f"{R}/augment/{m}/judge.json" for m in GENERATED] if config["report"]["judge"] else [],
        "judge_pool": [f"{R}/judge/pool_heldout.json"] if JUDGE_POOL and GENERATED else [],
        "image_stats": [f"{R}/augment/{m}/image_stats.json" for m in AUGMENTED] if config["report"]["image_stats"] else [],
        "truth": [f"{R}/world/pool/pool.parquet"] if TOY else [],
        "classes": f"{DATA}/classes.json",
        "real": f"{DATA}/target/train.parquet",
    }


def report_args(wildcards, input, output):
    """The report command's arguments, built from the resolved input and output files."""
    runs = " ".join(
        f"--run {shlex.quote(json.dumps({'method': m, 'n_aug': n, 'seed': s, 'metrics': f}))}"
        for (m, n, s), f in zip(train_runs(), input.metrics)
    )
    manifest = dict(zip(AUGMENTED, input.manifests))
    retrieval = retrieval_rows()
    retr = " ".join(f"--retrieval {m} {manifest[m]} {st} {fst}" for m, st, fst in zip(retrieval, input.stats, input.fetch_stats))
    truth = f"--truth {input.truth[0]}" if input.truth else ""
    fid = " ".join(f"--fidelity {m} {f}" for m, f in zip(GENERATED, input.fidelity))
    fid += "".join(f" --judge {m} {f}" for m, f in zip(GENERATED, input.judged))
    fid += "".join(f" --judge-pool {f}" for f in input.judge_pool)
    grids = " ".join(f"--grid {m} {manifest[m]} {out}" for m, out in zip(AUGMENTED, output.grids))
    augment = " ".join(f"--augment {m} {manifest[m]}" for m in AUGMENTED)
    augment += "".join(f" --filter {m} {f}" for m, f in zip(FILTERED, input.filters))
    gens = " ".join(f"--image-stats {m} {f}" for m, f in zip(AUGMENTED, input.image_stats))
    gens += " " + " ".join(f"--generator {m} {generator_of(m)['generator']} {generator_of(m)['guidance']}" for m in GENERATED)
    return f"{runs} {retr} {fid} {truth} {grids} {augment} {gens}"


def report_opts():
    """The report settings, a plain param (recorded by Snakemake: changing one reruns the report)."""
    rep = config["report"]
    # stages this config runs on a GPU beyond the ones that always do: their GPU-seconds count toward their rows' cost
    extra = (["search", "retrieve"] if GPU_SEARCH else []) + ([] if POOL_SHARDS else ["fetch"]) + ["judge"]
    gpu = f" --gpu --gpu-stages {' '.join(extra)}" if rep["gpu"] else ""
    return f"--grid-classes {rep['grid_classes']} --grid-images {rep['grid_images']}{gpu}"


# Retrieval: query modes, search blocks, the merge's and fetch's inputs.
MODES = sorted({method_of(m).retrieval_mode for m in retrieval_rows()})
SEARCH_THREADS = config["retrieve"]["threads"]


def search_mem_mb(wildcards, attempt):
    """A search job holds one tile (raw + float32), the queries of every mode and their top-k, plus ~1.5 GB of libraries."""
    dim = pool_dim()
    tile = config["retrieve"]["tile_rows"] * dim * 6
    n_queries = (len(CLASSES) * 200 if "image" in MODES else 0) + len(CLASSES) * len(config["retrieve"]["prompts"])
    return int((1500e6 + tile + n_queries * dim * 4 * 2 + n_queries * 2048 * 16) / 1e6 * attempt)


def search_minutes(wildcards):
    """One search block: queries x the block's rows x dim x 2 FLOP (a GPU ~50 TFLOP/s in fp16, a CPU core ~90 GFLOP/s,
    faiss.knn measured here) plus one read of the block's fp16 rows at ~0.5 GB/s. Rows: the parts' headers for a
    precomputed pool, else 1M per part (a LAION part)."""
    b = int(wildcards.block)
    parts = _parts[b * PARTS_PER_BLOCK:(b + 1) * PARTS_PER_BLOCK] if PRECOMPUTED else [None] * PARTS_PER_BLOCK
    rows = sum(part_shape(p)[0] if p is not None else 1_000_000 for p in parts)
    dim = pool_dim()
    n_queries = (len(CLASSES) * 200 if "image" in MODES else 0) + len(CLASSES) * len(config["retrieve"]["prompts"])
    rate = 50e12 if GPU_SEARCH else 90e9 * SEARCH_THREADS
    return (n_queries * rows * dim * 2 / rate + rows * dim * 2 / 0.5e9) / 60


def block_parts(wildcards):
    """The pool files of one search block."""
    b = int(wildcards.block)
    sl = slice(b * PARTS_PER_BLOCK, (b + 1) * PARTS_PER_BLOCK)
    return {"emb": POOL_EMB[sl], "meta": POOL_META[sl]}


def retrieve_inputs(wildcards):
    """What the merge of one mode reads: the search results, the pool's files (rows by part), the eval splits."""
    if config["retrieve"]["search"] == "index":
        found = [f"{R}/index/search/{wildcards.mode}.npz"]
    else:
        found = expand(f"{R}/retrieve/search/{{block}}.npz", block=BLOCKS)
    return {
        "blocks": found,
        "table": f"{R}/retrieve/{wildcards.mode}/queries.parquet",
        "pool_emb": POOL_EMB,
        "pool_meta": POOL_META,
        "classes": f"{DATA}/classes.json",
        "eval_emb": expand(f"{R}/embed/target/img_emb/{{split}}.npy", split=["val", "test"]),
        "eval_meta": expand(f"{R}/embed/target/metadata/{{split}}.parquet", split=["val", "test"]),
        "eval_tables": expand(f"{DATA}/target/{{split}}.parquet", split=["val", "test"]),
        "shards": POOL_SHARDS,
    }


def fetch_inputs(wildcards):
    """Local pools: the shards; remote pools: the downloaded candidates, the CLIP (content check) and the pool's embeddings."""
    mode = method_of(wildcards.method).retrieval_mode
    inputs = {"neighbors": f"{R}/retrieve/{mode}/neighbors.parquet", "classes": f"{DATA}/classes.json"}
    if POOL_SHARDS:
        return {**inputs, "shards": POOL_SHARDS}
    return {**inputs, **clip_input(), "downloads": f"{R}/retrieve/{mode}/downloads.parquet", "pool_emb": POOL_EMB,
            "pool_meta": POOL_META}


# A remote pool's downloads are content-checked with CLIP (fetch.min_cosine); a local pool's pixels are the embedded ones.
CONTENT_CHECK = not POOL_SHARDS and config["fetch"]["min_cosine"] is not None
# Images per second of the content check, for its runtime request: CLIP ViT-L/14 in fp16 embeds ~300 images/s on one
# A100 (clip-retrieval's figure); on a CPU about 2 (benchmarks/content_check.py measures this machine's rate).
CHECK_IMAGES_PER_S = 300 if config["device"] != "cpu" else 2


def eval_rows():
    """val + test images, for the merge's leak search: the toy world's counts, else val_per_class and ImageNet's 50 test
    images per class (a test folder is not scanned at parse time)."""
    if TOY_TARGET:
        return len(CLASSES) * (config["world"]["val_per_class"] + config["world"]["test_per_class"])
    t = config["target"]
    return len(CLASSES) * (t["val_per_class"] + (t["test_per_class"] or 50))


def merge_topk_mb():
    """The merged top-k lists of one mode: a (score, part, row) triple of 16 bytes per query and neighbour; k is derived
    so that a class's queries together hold n_aug x overfetch x margin neighbours (search.derive_k)."""
    return len(CLASSES) * retrieval_n() * overfetch() * config["retrieve"]["margin"] * 16 / 1e6


def leak_search_minutes():
    """The merge's leak search: the candidates a class can keep (n_aug x overfetch, plus a quarter) against val + test at
    2 FLOP per multiply-add; a CPU core does ~90 GFLOP/s (faiss.knn measured here), a GPU ~50 TFLOP/s in fp16."""
    flop = len(CLASSES) * (retrieval_n() * overfetch() * 1.25 + 16) * eval_rows() * pool_dim() * 2
    rate = 50e12 if GPU_SEARCH else 90e9 * SEARCH_THREADS
    return flop / rate / 60


def fetch_source(wildcards, input):
    """fetch's image source: the local pool's shards, or a remote pool's downloads with the content check's model, cache
    and precision (its embeddings cached by the downloaded bytes' sha256, shared by both modes)."""
    if POOL_SHARDS:
        return f"--shards {' '.join(map(shlex.quote, input.shards))}"
    return (f"--downloads {shlex.quote(input.downloads)} --check-cache {R}/retrieve/check_cache --model {shlex.quote(CLIP_MODEL)}"
            f" --precision {config['embed']['precision']} {pool_args()}")


def retrieved_candidates():
    """Ranked candidates of one query mode: classes x the largest n_aug x overfetch (what fetch downloads and checks)."""
    return len(CLASSES) * retrieval_n() * overfetch()


def filter_inputs(wildcards):
    """What a filtered row's filter reads: its candidates (the row's collect or fetch, under candidates/), CLIP (the
    clip score and the kept images' fidelity) and, for the classifier score, the `real` row's first-seed classifier."""
    inputs = {**clip_input(), "candidates": f"{R}/augment/{wildcards.method}/candidates/manifest.parquet",
              "classes": f"{DATA}/classes.json"}
    if FILTERS[filter_of(wildcards.method)].score == "classifier":
        inputs["classifier"] = f"{R}/train/real/0/{config['seeds'][0]}/model.pt"
    return inputs


def filter_settings(row):
    """A filtered row's filter settings (its FilterSpec without the version, which stage_spec adds)."""
    return {k: v for k, v in spec_dict(FILTERS[filter_of(row)]).items() if k != "version"}


def filter_args(wildcards, input):
    """The filter's spec (as a param: changing the filter reruns it) is passed apart; the classifier when it scores."""
    return f"--classifier {shlex.quote(input.classifier)}" if "classifier" in input.keys() else ""
