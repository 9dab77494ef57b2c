# Config validation, specs and input functions: the only Python in the workflow.
import json
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from augbench.methods import BASELINES, COND_METHODS, GENERATION_METHODS, PERSONALIZED, RETRIEVAL_MODES  # noqa: E402
from augbench.specs import STAGE_VERSIONS, WorldSpec, canonical_json, parse_spec  # noqa: E402
from augbench.world import world_kinds  # noqa: E402

validate(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml")

R = f"results/{config['dataset']}"
LOGS = f"logs/{config['dataset']}"
BENCH = f"benchmarks/{config['dataset']}"
TOY = config["pool"]["urls"] is None
PARTS = [f"{i:05d}" for i in range(config["pool"]["parts"])]
SPLITS = ["train", "train_extra", "val", "test"]
CLIP_MODEL = f"{R}/clip/model" if config["clip"]["model"] == "toy" else config["clip"]["model"]
SD_MODEL = f"{R}/diffusion/model" if config["diffusion"]["model"] == "toy" else config["diffusion"]["model"]
GENERATED = [m for m in config["methods"] if m in GENERATION_METHODS]


def dataset_classes():
    """(key, name) of each target class in label order: known before any job runs, so per-class jobs fan out."""
    spec = parse_spec(WorldSpec, {k: v for k, v in config["world"].items()})
    return [(k.key, k.nouns[0]) for k in world_kinds(spec)[: spec.n_classes]]


CLASSES = dataset_classes()
CLASS_KEYS = [k for k, _ in CLASSES]
CLASS_LABEL = {k: i for i, (k, _) in enumerate(CLASSES)}
CLASS_NAME = dict(CLASSES)


wildcard_constraints:
    part=r"\d{5}",
    split="|".join(SPLITS),
    mode="image|text",
    method=r"[a-z0-9_]+",
    n_aug=r"\d+",
    seed=r"\d+",
    cls=r"[A-Za-z0-9_.-]+",


def stage_spec(stage, **extra):
    """One canonical JSON string of a stage's settings plus its version: a changed setting reruns the stage."""
    section = {"world": "world", "download": "download", "embed": "embed", "index": "index", "train": "train",
               "personalize": "personalize", "generate": "generate"}.get(stage)
    data = dict(config[section]) if section else {}
    if stage == "pretrain_clip":
        data = dict(config["clip"]["train"])
    if stage == "pretrain_diffusion":
        data = dict(config["diffusion"]["train"])
    method = extra.get("method", "")
    if stage == "personalize":  # drop what this method does not use: changing it reruns nothing
        if not method.endswith("_dm"):
            data = {k: v for k, v in data.items() if k not in ("dm_finetune", "dm_lr", "lora_rank")}
        if method != "cond_clusters":
            data.pop("cluster_size", None)
    if stage == "generate":
        data["n_images"] = max(config["n_aug"])
        if method != "img2img":
            data.pop("strength", None)
        if method == "prompt_templates" or method in COND_METHODS:
            data.pop("prompt", None)
    if stage == "retrieve":
        data = {k: v for k, v in config["retrieve"].items() if not (extra.get("mode") == "image" and k == "prompts")}
        data["n_aug"] = max(config["n_aug"])
    data.update(extra)
    data["version"] = STAGE_VERSIONS[stage]
    return canonical_json(data)


def clip_input():
    """The toy CLIP folder is a workflow output; a real model (folder or hub id) is not an input file."""
    return {"model": CLIP_MODEL} if config["clip"]["model"] == "toy" else {}


def n_aug_values(method):
    """Baselines have no augmentation images: their only n_aug is 0."""
    return [0] if method in BASELINES else config["n_aug"]


def train_runs():
    """Every (method, n_aug, seed) of the run."""
    return [(m, n, s) for m in config["methods"] for n in n_aug_values(m) for s in config["seeds"]]


def augment_inputs(wildcards):
    """The augmentation set a training run reads (none for the baselines)."""
    if wildcards.method in BASELINES:
        return {}
    return {
        "aug_manifest": f"{R}/augment/{wildcards.method}/manifest.parquet",
        "aug_tar": f"{R}/augment/{wildcards.method}/images.tar",
    }


def real_splits(wildcards):
    """Real training tables: the shots, plus as many again for the real_x2 upper bound."""
    splits = ["train", "train_extra"] if wildcards.method == "real_x2" else ["train"]
    return [f"{R}/world/target/{s}.parquet" for s in splits]


def model_input():
    """The toy diffusion pipeline folder is a workflow output; Stable Diffusion (folder or hub id) is not."""
    return {"model": SD_MODEL} if config["diffusion"]["model"] == "toy" else {}


def personalize_inputs(wildcards):
    """What personalising one class reads: the model, the real training table, and CLIP embeddings for clusters."""
    inputs = {**model_input(), "table": f"{R}/world/target/train.parquet"}
    if wildcards.method == "cond_clusters":
        inputs["emb"] = f"{R}/embed/target/img_emb/train.npy"
        inputs["meta"] = f"{R}/embed/target/metadata/train.parquet"
    return inputs


def generate_inputs(wildcards):
    """What generating one class reads: the model, its personalisation folder, or its real images (img2img)."""
    inputs = {**model_input(), "table": f"{R}/world/target/train.parquet"}
    if wildcards.method in PERSONALIZED:
        inputs["personalization"] = f"{R}/personalize/{wildcards.method}/{wildcards.cls}"
    return inputs


def class_args(wildcards):
    """The label and display name of a class wildcard, as command-line arguments."""
    return f"--label {CLASS_LABEL[wildcards.cls]} --name {shlex.quote(CLASS_NAME[wildcards.cls])} --class-key {wildcards.cls}"


def report_inputs():
    """Metrics of every run, and the retrieval methods' manifests and stats (for precision and leaks)."""
    runs = [f"{R}/train/{m}/{n}/{s}/metrics.json" for m, n, s in train_runs()]
    retrieval = [m for m in config["methods"] if m in RETRIEVAL_MODES]
    return {
        "metrics": runs,
        "manifests": [f"{R}/augment/{m}/manifest.parquet" for m in retrieval],
        "stats": [f"{R}/retrieve/{RETRIEVAL_MODES[m]}/stats.json" for m in retrieval],
        "fidelity": [f"{R}/augment/{m}/fidelity.json" for m in GENERATED],
        "truth": [f"{R}/world/pool/pool.parquet"] if TOY else [],
    }


def report_args(wildcards, input):
    """The report command's arguments, built from the resolved input files."""
    runs = " ".join(
        f"--run {shlex.quote(json.dumps({'method': m, 'n_aug': n, 'seed': s, 'metrics': f}))}"
        for (m, n, s), f in zip(train_runs(), input.metrics)
    )
    retrieval = [m for m in config["methods"] if m in RETRIEVAL_MODES]
    retr = " ".join(
        f"--retrieval {m} {man} {st}" for m, man, st in zip(retrieval, input.manifests, input.stats)
    )
    truth = f"--truth {input.truth[0]}" if input.truth else ""
    fid = " ".join(f"--fidelity {m} {f}" for m, f in zip(GENERATED, input.fidelity))
    return f"{runs} {retr} {fid} {truth}"
