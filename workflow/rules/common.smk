# Config validation, specs and input functions: the only Python in the workflow.
import json
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from augbench.specs import STAGE_VERSIONS, canonical_json  # noqa: E402

validate(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml")

R = f"results/{config['dataset']}"
LOGS = f"logs/{config['dataset']}"
BENCH = f"benchmarks/{config['dataset']}"
TOY = config["pool"]["urls"] is None
PARTS = [f"{i:05d}" for i in range(config["pool"]["parts"])]
RETRIEVAL_MODES = {"retrieval_image": "image", "retrieval_text": "text"}
SPLITS = ["train", "train_extra", "val", "test"]
CLIP_MODEL = f"{R}/clip/model" if config["clip"]["model"] == "toy" else config["clip"]["model"]


wildcard_constraints:
    part=r"\d{5}",
    split="|".join(SPLITS),
    mode="image|text",
    method=r"[a-z0-9_]+",
    n_aug=r"\d+",
    seed=r"\d+",


def stage_spec(stage, **extra):
    """One canonical JSON string of a stage's settings plus its version: a changed setting reruns the stage."""
    section = {"world": "world", "download": "download", "embed": "embed", "index": "index", "train": "train"}.get(stage)
    data = dict(config[section]) if section else {}
    if stage == "pretrain_clip":
        data = dict(config["clip"]["train"])
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
    return [0] if method in ("real", "real_x2") else config["n_aug"]


def train_runs():
    """Every (method, n_aug, seed) of the run."""
    return [(m, n, s) for m in config["methods"] for n in n_aug_values(m) for s in config["seeds"]]


def augment_inputs(wildcards):
    """The augmentation set a training run reads (none for the baselines)."""
    if wildcards.method in ("real", "real_x2"):
        return {}
    return {
        "aug_manifest": f"{R}/augment/{wildcards.method}/manifest.parquet",
        "aug_tar": f"{R}/augment/{wildcards.method}/images.tar",
    }


def real_splits(wildcards):
    """Real training tables: the shots, plus as many again for the real_x2 upper bound."""
    splits = ["train", "train_extra"] if wildcards.method == "real_x2" else ["train"]
    return [f"{R}/world/target/{s}.parquet" for s in splits]


def report_inputs():
    """Metrics of every run, and the retrieval methods' manifests and stats (for precision and leaks)."""
    runs = [f"{R}/train/{m}/{n}/{s}/metrics.json" for m, n, s in train_runs()]
    retrieval = [m for m in config["methods"] if m in RETRIEVAL_MODES]
    return {
        "metrics": runs,
        "manifests": [f"{R}/augment/{m}/manifest.parquet" for m in retrieval],
        "stats": [f"{R}/retrieve/{RETRIEVAL_MODES[m]}/stats.json" for m in retrieval],
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
    return f"{runs} {retr} {truth}"
