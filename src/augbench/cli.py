"""Thin CLI: each sub-command maps its arguments onto one library function.

Settings arrive as one canonical JSON `--spec` (see augbench.specs); paths as arguments.
Logging goes to stderr in a form that reads well in a Slurm log: first line the command and its
arguments, last line the result and elapsed time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

log = logging.getLogger("augbench")


def _paths(values: list[str] | None) -> list[Path]:
    return [Path(v) for v in values or []]


Adder = Callable[[argparse.ArgumentParser], object]
Runner = Callable[[argparse.Namespace], object]
COMMANDS: dict[str, tuple[str, Runner, tuple[Adder, ...]]] = {}  # name -> (one-line help, function, its options)


def arg(*flags: str, **kw: Any) -> Adder:
    """One option of a sub-command, as `add_argument` takes it."""
    return lambda s: s.add_argument(*flags, **kw)


def one_of(*args: Adder) -> Adder:
    """Options of which exactly one must be given."""

    def add(s: argparse.ArgumentParser) -> None:
        group = s.add_mutually_exclusive_group(required=True)
        for a in args:
            a(group)  # type: ignore[arg-type]

    return add


def command(name: str, help_text: str, *args: Adder) -> Callable[[Runner], Runner]:
    """Declare the sub-command `name` (its one-line help and its options) on the function that runs it."""

    def register(fn: Runner) -> Runner:
        COMMANDS[name] = (help_text, fn, args)
        return fn

    return register


def _pool_args(s: argparse.ArgumentParser, required: bool = True) -> None:
    """Pool parts as parallel lists of embedding files, metadata files and names (the workflow's pool_args)."""
    s.add_argument("--pool-emb", nargs="+", required=required)
    s.add_argument("--pool-meta", nargs="+", required=required)
    s.add_argument("--pool-names", nargs="+", required=required)
    s.add_argument("--pool-layout", choices=("clip_retrieval", "datacomp"), default="clip_retrieval")
    s.add_argument("--embedding-key", default="l14_img")
    s.add_argument("--first-part", type=int, default=0, help="global number of the first part given")


def _query_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--modes", nargs="+", required=True)
    s.add_argument("--queries", nargs="+", required=True, help="<mode>/queries.npy files")
    s.add_argument("--tables", nargs="+", required=True, help="<mode>/queries.parquet files")


def _job_args(s: argparse.ArgumentParser) -> None:
    """Where and on how many threads a job runs: scheduling, never part of a spec."""
    s.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None,
                   help="cuda: fail without a usable GPU; auto: GPU if usable, else the CPU (default: $AUGBENCH_DEVICE or auto)")
    s.add_argument("--threads", type=int, default=1, help="CPU threads (scheduling: not part of the spec)")


def _class_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--classes", required=True, help="classes.json: labels and display names")
    s.add_argument("--keys", nargs="+", required=True, help="the class keys of this block, processed in this order")


@command("world", "render the toy world (target splits + captioned pool)",
         arg("--spec", default="{}"),
         arg("--out", required=True))
def cmd_world(a: argparse.Namespace) -> object:
    from augbench.specs import WorldSpec, parse_spec
    from augbench.toy.world import build_world

    return build_world(parse_spec(WorldSpec, a.spec), Path(a.out))


@command("judge-pool", "the toy world's pool images of target kinds, by true kind: the judge's extra training and held-out sets",
         arg("--world", required=True),
         arg("--train-per-class", type=int, required=True),
         arg("--heldout-per-class", type=int, required=True),
         arg("--out-train", required=True),
         arg("--out-heldout", required=True))
def cmd_judge_pool(a: argparse.Namespace) -> object:
    from augbench.toy.world import judge_pool_tables

    return judge_pool_tables(Path(a.world), a.train_per_class, a.heldout_per_class, Path(a.out_train), Path(a.out_heldout))


@command("target", "split tables of a class-per-folder dataset (ImageNet, Caltech256, ImageFolder)",
         arg("--spec", required=True),
         arg("--out", required=True))
def cmd_target(a: argparse.Namespace) -> object:
    from augbench.specs import parse_spec
    from augbench.target import TargetSpec, build_target

    return build_target(parse_spec(TargetSpec, a.spec), Path(a.out))


@command("parts", "split a url/caption table into download parts",
         arg("--pool", required=True),
         arg("--out", nargs="+", required=True))
def cmd_parts(a: argparse.Namespace) -> object:
    from augbench.download import split_parts

    return split_parts(Path(a.pool), _paths(a.out))


@command("download", "download one part with img2dataset (resumable)",
         arg("--threads", type=int, default=1, help="img2dataset processes (scheduling: not part of the spec)"),
         arg("--thread-count", type=int, default=16, help="img2dataset download threads per process"),
         *[arg(f"--{name}", required=True) for name in ("urls", "out-tar", "out-status", "out-stats", "cache")],
         arg("--serve", help="serve this folder on 127.0.0.1 during the download; urls are relative to it"),
         arg("--spec", default="{}"))
def cmd_download(a: argparse.Namespace) -> object:
    from augbench.download import download_part
    from augbench.specs import DownloadSpec, parse_spec

    return download_part(Path(a.urls), Path(a.out_tar), Path(a.out_status), Path(a.out_stats), Path(a.cache),
                         parse_spec(DownloadSpec, a.spec), serve=Path(a.serve) if a.serve else None,
                         processes=a.threads, thread_count=a.thread_count)


@command("pretrain-clip", "train the toy world's tiny CLIP on pool shards",
         _job_args,
         arg("--shards", nargs="+", required=True),
         arg("--out", required=True),
         arg("--spec", default="{}"))
def cmd_pretrain_clip(a: argparse.Namespace) -> object:
    from augbench.specs import ClipSpec, parse_spec
    from augbench.toy.clip_train import pretrain_clip

    return pretrain_clip(_paths(a.shards), Path(a.out), parse_spec(ClipSpec, a.spec))


@command("pretrain-diffusion", "train the toy world's tiny latent diffusion model on pool shards",
         _job_args,
         arg("--shards", nargs="+", required=True),
         arg("--clip", required=True, help="CLIP folder or hub id whose text tower becomes the frozen text encoder"),
         arg("--classes", help="classes.json: class names for the fidelity learning curve (spec eval_every)"),
         arg("--out", required=True),
         arg("--spec", default="{}"))
def cmd_pretrain_diffusion(a: argparse.Namespace) -> object:
    from augbench.specs import DiffusionSpec, parse_spec
    from augbench.toy.diffusion import pretrain_diffusion

    names = None
    if a.classes:
        info = json.loads(Path(a.classes).read_text())
        names = [info["names"][k] for k in info["classes"]]
    return pretrain_diffusion(_paths(a.shards), a.clip, Path(a.out), parse_spec(DiffusionSpec, a.spec), names=names)


@command("ship-toy", "copy the trained toy CLIP and LDM to models/toy in fp16 with a manifest (make toy-models)",
         *[arg(f"--{name}", required=True) for name in ("clip", "diffusion", "world", "out")],
         arg("--command", required=True, help="the command that rebuilds them (recorded in the manifest)"))
def cmd_ship_toy(a: argparse.Namespace) -> object:
    from augbench.toy.ship import ship

    manifest = ship(Path(a.clip), Path(a.diffusion), Path(a.world), Path(a.out), a.command)
    return {"size_mb": manifest["size_mb"], **{k: v for k, v in manifest["quality"].items() if k != "fidelity_learning_curve"}}


def _block(a: argparse.Namespace) -> list[tuple[str, int, str]]:
    """(key, label, display name) of the block's classes (--keys) from classes.json (--classes)."""
    info = json.loads(Path(a.classes).read_text())
    label = {k: i for i, k in enumerate(info["classes"])}
    unknown = [k for k in a.keys if k not in label]
    if unknown:
        raise ValueError(f"{a.classes}: no class(es) {unknown}")
    return [(k, label[k], info["names"].get(k, k)) for k in a.keys]


@command("personalize", "personalise a diffusion model to each class of a block (one model load)",
         _job_args,
         arg("--model", required=True, help="a diffusers text-to-image pipeline folder or hub id"),
         arg("--architecture", default="auto", help="its architecture (augbench.architectures), checked against "
             "model_index.json; auto: read from it"),
         arg("--gradient-checkpointing", action="store_true", help="recompute the denoiser's activations in the "
             "backward pass (memory for time; changes no result)"),
         arg("--table", required=True, help="training split table (path, label, class)"),
         arg("--root", required=True, help="folder the table's paths are relative to"),
         _class_args,
         arg("--emb", help="training split CLIP embeddings (cond_clusters)"),
         arg("--meta", help="their metadata parquet"),
         arg("--out", required=True, help="the block's folder: one sub-folder per class"),
         arg("--cache", required=True, help="per-class results, kept across blocks and killed jobs"),
         arg("--spec", default="{}"))
def cmd_personalize(a: argparse.Namespace) -> object:
    from augbench.personalize import personalize_block
    from augbench.specs import PersonalizeSpec, parse_spec

    emb = (Path(a.emb), Path(a.meta)) if a.emb else None
    return personalize_block(a.model, Path(a.table), Path(a.root), _block(a), Path(a.out), Path(a.cache),
                             parse_spec(PersonalizeSpec, a.spec), embeddings=emb, architecture=a.architecture,
                             gradient_checkpointing=a.gradient_checkpointing)


@command("generate", "generate each class of a block with one method (one model load; cached by chunk)",
         _job_args,
         arg("--model", required=True, help="a diffusers text-to-image pipeline folder or hub id"),
         arg("--architecture", default="auto", help="its architecture (augbench.architectures), checked against "
             "model_index.json; auto: read from it"),
         arg("--offload", default="none", choices=["none", "model", "sequential"], help="on a GPU: diffusers' model / "
             "sequential CPU offload (memory for time; changes no pixel)"),
         arg("--table", required=True, help="training split table (img2img sources)"),
         arg("--root", required=True),
         _class_args,
         arg("--personalization", help="the block's personalisation folder (personalised methods)"),
         arg("--cache", required=True, help="chunk cache: one sub-folder per class"),
         arg("--out", required=True, help="the block's folder: <class>/manifest.parquet and chunks/"),
         arg("--spec", default="{}"))
def cmd_generate(a: argparse.Namespace) -> object:
    from augbench.generate import generate_block
    from augbench.specs import GenerateSpec, parse_spec

    return generate_block(a.model, _block(a), Path(a.out), Path(a.cache), parse_spec(GenerateSpec, a.spec),
                          personalization=Path(a.personalization) if a.personalization else None,
                          real=(Path(a.table), Path(a.root)), architecture=a.architecture, offload=a.offload)


@command("collect", "join a method's per-class images and measure generation fidelity",
         _job_args,
         arg("--manifests", nargs="+", required=True, help="the per-class manifests (pointers into their chunks)"),
         arg("--classes", required=True),
         arg("--clip", required=True),
         arg("--out-manifest", required=True),
         arg("--out-fidelity", required=True))
def cmd_collect(a: argparse.Namespace) -> object:
    from augbench.generate import collect

    return collect(_paths(a.manifests), Path(a.classes), a.clip, Path(a.out_manifest), Path(a.out_fidelity))


@command("filter", "keep what a filter keeps of a row's candidates: a filtered row's augmentation set and its yield",
         _job_args,
         arg("--candidates", required=True, help="the candidates' manifest (pointers)"),
         arg("--classes", required=True),
         arg("--spec", required=True, help="the filter (FilterSpec) as JSON"),
         arg("--n-aug", type=int, required=True, help="the largest n_aug: at most this many kept per class"),
         arg("--clip", help="CLIP folder or hub id (the clip score and the kept images' fidelity)"),
         arg("--classifier", help="the real-shot classifier's model.pt (score: classifier)"),
         arg("--out-manifest", required=True),
         arg("--out-stats", required=True),
         arg("--out-fidelity"))
def cmd_filter(a: argparse.Namespace) -> object:
    from augbench.filtering import filter_set
    from augbench.specs import FilterSpec, parse_spec

    return filter_set(Path(a.candidates), Path(a.classes), parse_spec(FilterSpec, a.spec), a.n_aug, Path(a.out_manifest),
                      Path(a.out_stats), a.clip, Path(a.classifier) if a.classifier else None,
                      Path(a.out_fidelity) if a.out_fidelity else None)


@command("embed", "CLIP-embed one pool shard or one target split",
         _job_args,
         one_of(arg("--shard"), arg("--split", help="split table (path, label, class)")),
         arg("--root", default=".", help="folder the split table's paths are relative to"),
         arg("--model", required=True, help="CLIP folder or hub id"),
         arg("--out-emb", required=True),
         arg("--out-meta", required=True),
         arg("--spec", default="{}"))
def cmd_embed(a: argparse.Namespace) -> object:
    from augbench.embed import embed_shard, embed_split
    from augbench.specs import EmbedSpec, parse_spec

    spec = parse_spec(EmbedSpec, a.spec)
    if a.shard:
        return embed_shard(Path(a.shard), a.model, Path(a.out_emb), Path(a.out_meta), spec)
    return embed_split(Path(a.split), Path(a.root), a.model, Path(a.out_emb), Path(a.out_meta), spec)


def _parts(a: argparse.Namespace) -> list:
    """The pool parts named by --pool-emb/--pool-meta/--pool-names (see augbench.pool)."""
    from augbench.pool import PoolPart

    key = a.embedding_key if a.pool_layout == "datacomp" else None
    return [PoolPart(n, Path(e), Path(m), a.pool_layout, key)
            for e, m, n in zip(a.pool_emb, a.pool_meta, a.pool_names, strict=True)]


def _query_files(a: argparse.Namespace) -> dict[str, tuple[Path, Path]]:
    """{mode: (vectors, table)} from --modes/--queries/--tables, matched by the mode in the file's folder name."""
    out = {}
    for mode in a.modes:
        vec = next(Path(q) for q in a.queries if Path(q).parent.name == mode)
        table = next(Path(t) for t in a.tables if Path(t).parent.name == mode)
        out[mode] = (vec, table)
    return out


@command("queries", "one retrieval mode's query vectors: training images (image) or class prompts (text)",
         arg("--mode", choices=("image", "text"), required=True),
         *[arg(f"--{name}", required=True) for name in ("classes", "train-emb", "train-meta", "out-vectors", "out-table")],
         arg("--model", help="CLIP folder or hub id (text mode)"),
         arg("--prompts", nargs="*", default=[]))
def cmd_queries(a: argparse.Namespace) -> object:
    from augbench.retrieve import make_queries

    return make_queries(a.mode, Path(a.classes), Path(a.out_vectors), Path(a.out_table), tuple(a.prompts or ()),
                        train=(Path(a.train_emb), Path(a.train_meta)), model=a.model)


def _search_device(device: str | None) -> str:
    """cpu or cuda for the faiss / matrix-product searches; torch is imported only where a GPU may be used."""
    if device == "cpu":
        return "cpu"
    from augbench.device import pick_device

    return pick_device(device).type


@command("search", "exact search of one block of pool parts (the map step)",
         _pool_args,
         _query_args,
         arg("--tile-rows", type=int, default=131072),
         arg("--device", choices=("cpu", "auto", "cuda"), default="cpu"),
         arg("--out", required=True),
         arg("--spec", required=True))
def cmd_search(a: argparse.Namespace) -> object:
    from augbench.search import search_block

    return search_block(_parts(a), a.first_part, _query_files(a), Path(a.out), json.loads(a.spec) | {"tile_rows": a.tile_rows},
                        device=_search_device(a.device))


@command("retrieve", "merge search blocks into ranked, de-duplicated, leak-filtered candidates per class",
         _pool_args,
         arg("--blocks", nargs="+", required=True),
         *[arg(f"--{name}", required=True) for name in ("table", "classes", "out", "out-stats", "spec")],
         arg("--eval-emb", nargs="*", default=[]),
         arg("--eval-meta", nargs="*", default=[]),
         arg("--pool-shards", nargs="*", help="local pool shards, one per part (pixel confirmation of leak suspects)"),
         arg("--eval-root", help="folder the eval tables' paths are relative to (pixel confirmation)"),
         _job_args)
def cmd_retrieve(a: argparse.Namespace) -> object:
    from augbench.retrieve import merge
    from augbench.specs import RetrieveSpec, parse_spec

    evals = list(zip(_paths(a.eval_emb), _paths(a.eval_meta), strict=True))
    return merge(_paths(a.blocks), Path(a.table), _parts(a), Path(a.classes), evals, Path(a.out), Path(a.out_stats),
                 parse_spec(RetrieveSpec, a.spec), pool_shards=_paths(a.pool_shards) or None,
                 eval_root=Path(a.eval_root) if a.eval_root else None, device=_search_device(a.device))


@command("fetch", "materialise retrieved images from local shards or by download (resumable)",
         lambda s: _pool_args(s, required=False),
         *[arg(f"--{name}", required=True) for name in ("neighbors", "classes", "out-tar", "out-manifest", "out-stats", "spec")],
         arg("--n-aug", type=int, required=True),
         arg("--shards", nargs="*", help="local pool shards, one per part"),
         arg("--cache", help="remote pools: the url cache folder"),
         arg("--download-spec", help="remote pools: img2dataset settings"),
         arg("--model", help="remote pools: CLIP for the content check"),
         arg("--downloads", help="remote pools: the download-retrieved table (else fetch downloads first)"),
         arg("--check-cache", help="remote pools: folder of CLIP embeddings by the downloaded bytes' sha256"),
         arg("--device", choices=("auto", "cuda", "cpu"), default=None, help="where the content check runs CLIP"),
         arg("--precision", choices=("fp16", "fp32"), default="fp32", help="fp16: half-precision CLIP on a GPU"),
         arg("--batch-size", type=int, default=256, help="images per CLIP call of the content check"),
         arg("--shard-size", type=int, default=10000),
         arg("--threads", type=int, default=1, help="img2dataset processes"),
         arg("--thread-count", type=int, default=16, help="img2dataset download threads per process"))
def cmd_fetch(a: argparse.Namespace) -> object:
    from augbench.fetch import CheckSettings, fetch
    from augbench.specs import DownloadSpec, FetchSpec, parse_spec

    dl = parse_spec(DownloadSpec, a.download_spec) if a.download_spec else None
    classes = json.loads(Path(a.classes).read_text())["classes"]
    check = CheckSettings(a.device, a.precision, a.batch_size, Path(a.check_cache) if a.check_cache else None)
    return fetch(Path(a.neighbors), Path(a.out_tar), Path(a.out_manifest), Path(a.out_stats), a.n_aug, parse_spec(FetchSpec, a.spec),
                 classes,
                 shards=_paths(a.shards) or None, cache=Path(a.cache) if a.cache else None, download_spec=dl, model=a.model,
                 parts=_parts(a) if a.pool_emb else None, processes=a.threads, shard_size=a.shard_size,
                 thread_count=a.thread_count, downloads=Path(a.downloads) if a.downloads else None, check=check)


@command("download-retrieved", "download a mode's candidate urls into the url cache (img2dataset, CPU)",
         *[arg(f"--{name}", required=True) for name in ("neighbors", "cache", "download-spec", "out")],
         arg("--shard-size", type=int, default=10000),
         arg("--threads", type=int, default=1, help="img2dataset processes"),
         arg("--thread-count", type=int, default=16, help="img2dataset download threads per process"))
def cmd_download_retrieved(a: argparse.Namespace) -> object:
    from augbench.fetch import download_candidates
    from augbench.specs import DownloadSpec, parse_spec

    return download_candidates(Path(a.neighbors), Path(a.out), Path(a.cache), parse_spec(DownloadSpec, a.download_spec), a.threads,
                               a.shard_size, a.thread_count)


@command("index-train", "train the ANN index's quantizer on a sample of the pool",
         _pool_args,
         arg("--out", required=True),
         arg("--spec", required=True),
         arg("--threads", type=int, default=1))
def cmd_index_train(a: argparse.Namespace) -> object:
    from augbench.index import train_index
    from augbench.specs import IndexSpec, parse_spec

    return train_index(_parts(a), Path(a.out), parse_spec(IndexSpec, a.spec), threads=a.threads)


@command("index-add", "add one pool part to a copy of the trained index",
         _pool_args,
         arg("--trained", required=True),
         arg("--out", required=True),
         arg("--threads", type=int, default=1))
def cmd_index_add(a: argparse.Namespace) -> object:
    from augbench.index import add_part

    return add_part(Path(a.trained), _parts(a)[0], a.first_part, Path(a.out), threads=a.threads)


@command("index-merge", "merge the parts' inverted lists on disk",
         arg("--trained", required=True),
         arg("--parts", nargs="+", required=True),
         arg("--out-index", required=True),
         arg("--out-ivfdata", required=True))
def cmd_index_merge(a: argparse.Namespace) -> object:
    from augbench.index import merge_index

    return merge_index(Path(a.trained), _paths(a.parts), Path(a.out_index), Path(a.out_ivfdata))


@command("index-recall", "recall@10 of the ANN index against exact search on the real queries",
         _pool_args,
         arg("--index", required=True),
         arg("--queries", nargs="+", required=True),
         arg("--out", required=True),
         arg("--spec", required=True),
         arg("--threads", type=int, default=1))
def cmd_index_recall(a: argparse.Namespace) -> object:
    from augbench.index import index_recall
    from augbench.specs import IndexSpec, parse_spec

    return index_recall(Path(a.index), _parts(a), _paths(a.queries), Path(a.out), parse_spec(IndexSpec, a.spec), threads=a.threads)


@command("index-search", "search one mode's queries with the ANN index (re-ranked exactly)",
         _pool_args,
         _query_args,
         arg("--index", required=True),
         arg("--nprobe", type=int, default=16),
         arg("--refine", type=int, default=1),
         arg("--out", required=True),
         arg("--spec", required=True),
         arg("--threads", type=int, default=1))
def cmd_index_search(a: argparse.Namespace) -> object:
    from augbench.index import search_index

    return search_index(Path(a.index), _parts(a), _query_files(a), Path(a.out), json.loads(a.spec), a.nprobe, a.refine, a.threads)


@command("fetch-model", "download a hub model once into the model cache (snapshot_download)",
         arg("--repo", required=True),
         arg("--revision"),
         arg("--out", required=True))
def cmd_fetch_model(a: argparse.Namespace) -> object:
    from augbench.hub import fetch_model

    return fetch_model(a.repo, a.revision, Path(a.out))


@command("query", "print the pool's nearest items to a text or an image (url, caption, score)",
         _pool_args,
         one_of(arg("--text"), arg("--image")),
         arg("--model", required=True, help="the CLIP that embedded the pool (folder or hub id)"),
         arg("-k", type=int, default=10),
         arg("--index", help="the merged ANN index (index/pool.index); without it the parts are scanned exactly"),
         arg("--nprobe", type=int, default=16),
         arg("--refine", type=int, default=10))
def cmd_query(a: argparse.Namespace) -> object:
    from augbench.query import query

    return query(a.text, Path(a.image) if a.image else None, a.model, _parts(a), a.k, Path(a.index) if a.index else None,
                 a.nprobe, a.refine)


@command("plan", "per rule: jobs, GPUs, CPUs, memory, runtime; totals; checked against a site's limits",
         arg("configfile", nargs="+", help="config files, as for snakemake --configfile"),
         arg("--profile", required=True, help="the Snakemake profile folder (profiles/slurm)"),
         arg("--site", help="each partition's limits (default: site.yaml in the profile folder)"),
         arg("--directory", help="the run's working directory (snakemake --directory)"),
         arg("--group-components", type=int, help="block chains per GPU allocation, over the profile's (as the run's "
             "snakemake --group-components <group>=N; must equal the config's gpu_share)"))
def cmd_plan(a: argparse.Namespace) -> object:
    from augbench.plan import run

    site = Path(a.site) if a.site else Path(a.profile) / "site.yaml"
    code, table = run(_paths(a.configfile), Path(a.profile), site, Path(a.directory) if a.directory else None,
                      group_components=a.group_components)
    print(table)
    if code:
        raise ValueError(f"the plan does not fit the site {site}: see the errors above")
    return "fits"


@command("train", "train and evaluate the classifier for one (method, n_aug, seed)",
         _job_args,
         *[arg(f"--{name}", required=True) for name in ("root", "test", "classes", "out-metrics", "out-ckpt")],
         arg("--real", nargs="+", required=True, help="real splits: decoded folders or split tables"),
         arg("--aug-manifest", nargs="*", default=[], help="augmentation sets: manifests with pointers to their images"),
         arg("--n-aug", type=int, default=0),
         arg("--seed", type=int, default=0),
         arg("--spec", default="{}"))
def cmd_train(a: argparse.Namespace) -> object:
    from augbench.classify import train
    from augbench.specs import TrainSpec, parse_spec

    augment = _paths(a.aug_manifest)
    n_classes = len(json.loads(Path(a.classes).read_text())["classes"])
    return train(_paths(a.real), Path(a.root), Path(a.test), augment, a.n_aug, a.seed, n_classes,
                 Path(a.out_metrics), Path(a.out_ckpt), parse_spec(TrainSpec, a.spec))


@command("decode", "decode a split or an augmentation set once into the classifier's uint8 array file",
         arg("--threads", type=int, default=1, help="CPU threads (scheduling: not part of the spec)"),
         one_of(arg("--table", help="a split table (path, label)"), arg("--manifest", help="an augmentation set's manifest (pointers)")),
         arg("--root", default=".", help="folder the table's paths are relative to"),
         arg("--size", type=int, required=True, help="train.load_size (else input_size): the stored square's side"),
         arg("--out", required=True))
def cmd_decode(a: argparse.Namespace) -> object:
    from augbench.decoded import decode_augment, decode_split

    if a.manifest:
        return decode_augment(Path(a.manifest), a.size, Path(a.out))
    return decode_split(Path(a.table), Path(a.root), a.size, Path(a.out))


@command("judge", "score a method's generated images with the judge classifier (independent of CLIP)",
         _job_args,
         *[arg(f"--{name}", required=True) for name in ("ckpt", "judge-metrics", "classes", "out")],
         arg("--images", required=True, help="the set's decoded folder (memory-mapped), or its manifest"))
def cmd_judge(a: argparse.Namespace) -> object:
    from augbench.classify import judge

    return judge(Path(a.ckpt), Path(a.judge_metrics), Path(a.images), Path(a.classes), Path(a.out))


@command("image-stats", "diversity within each class and KID to the real images of an augmentation set (CLIP features)",
         _job_args,
         arg("--images", required=True, help="the set's decoded folder"),
         arg("--real", required=True, help="the real training split's decoded folder"),
         arg("--clip", required=True, help="CLIP folder or hub id"),
         arg("--out", required=True))
def cmd_image_stats(a: argparse.Namespace) -> object:
    from augbench.imagestats import image_stats

    return image_stats(Path(a.images), Path(a.real), a.clip, Path(a.out))


@command("report", "aggregate metrics into results.csv / results.md",
         arg("--run", action="append", required=True, help='JSON {"method","n_aug","seed","metrics"}'),
         arg("--retrieval", action="append", nargs=4, metavar=("METHOD", "MANIFEST", "MERGE_STATS", "FETCH_STATS")),
         arg("--fidelity", action="append", nargs=2, metavar=("METHOD", "FIDELITY_JSON")),
         arg("--judge", action="append", nargs=2, metavar=("METHOD", "JUDGE_JSON"), help="the judge's fidelity (report.judge)"),
         arg("--judge-pool", help="toy world: the judge's score on held-out pool images (judge/pool_heldout.json)"),
         arg("--augment", action="append", nargs=2, metavar=("METHOD", "MANIFEST"), help="achieved images per class"),
         arg("--filter", action="append", nargs=2, metavar=("ROW", "FILTER_JSON"), help="a filtered row's yield"),
         arg("--image-stats", action="append", nargs=2, metavar=("METHOD", "IMAGE_STATS_JSON"),
             help="diversity and KID to the real images of a row's set"),
         arg("--generator", action="append", nargs=3, metavar=("ROW", "GENERATOR", "GUIDANCE"),
             help="a generated row's generator and guidance scale (the table's generator columns)"),
         arg("--truth", help="pool table with hidden true labels (toy world only)"),
         arg("--benchmarks", help="the run's benchmarks/<dataset> folder: cost per method"),
         arg("--logs", help="the run's logs/<dataset> folder: each job's own CPU seconds, from its closing log line"),
         arg("--gpu", action="store_true", help="GPU rules ran on GPUs (their wall time is GPU time)"),
         arg("--gpu-stages", nargs="*", help="stages this config ran on a GPU beyond report.GPU_STAGES (search, ...)"),
         arg("--grid", action="append", nargs=3, metavar=("METHOD", "MANIFEST", "OUT_PNG")),
         arg("--grid-classes", type=int, default=4),
         arg("--grid-images", type=int, default=6),
         arg("--classes", help="classes.json (grids)"),
         arg("--real-table", help="real training split table (grids)"),
         arg("--root", default=".", help="folder the real table's paths are relative to"),
         arg("--out-csv", required=True),
         arg("--out-md", required=True),
         arg("--out-yield", help="yield.csv: every (method, n_aug, class) short of n_aug, with the reasons"),
         arg("--out-html"),
         arg("--out-plot"),
         arg("--out-cost"),
         arg("--out-method-cost", help="cost_by_method.csv: each row's measured CPU/GPU hours"))
def cmd_report(a: argparse.Namespace) -> object:
    import pandas as pd

    from augbench import report

    runs = [json.loads(r) for r in a.run]
    retrieval = {m: {"manifest": Path(man), "stats": Path(st), "fetch_stats": Path(fst)} for m, man, st, fst in a.retrieval or []}
    truth = pd.read_parquet(a.truth) if a.truth else None
    fidelity = {m: Path(f) for m, f in a.fidelity or []}
    manifests = {m: Path(f) for m, f in a.augment or []}
    n_classes = len(json.loads(Path(a.classes).read_text())["classes"]) if a.classes else None
    judged = {m: Path(f) for m, f in a.judge or []}
    generators = {row: (name, float(g)) for row, name, g in a.generator or []}
    image_stats = {m: Path(f) for m, f in a.image_stats or []}
    table = report.build_table(runs, retrieval, truth, fidelity, manifests, n_classes, judged, generators, image_stats)
    if a.benchmarks:
        bench = report.read_benchmarks(Path(a.benchmarks), Path(a.logs) if a.logs else None)
        stages = report.GPU_STAGES | set(a.gpu_stages or [])
        table = report.add_cost(table, bench, a.gpu, stages)
        if a.out_cost:
            with report.atomic_path(Path(a.out_cost)) as tmp:
                report.stage_costs(bench, a.gpu, stages).to_csv(tmp, index=False, float_format="%.6g")
    filters = {m: Path(f) for m, f in a.filter or []}
    notes = report.judge_note(judged, Path(a.judge_pool) if a.judge_pool else None) + report.filter_note(filters)
    if a.out_yield:
        classes_all = json.loads(Path(a.classes).read_text())["classes"]
        yields = report.yield_table(list(zip(table["method"], table["n_aug"], strict=True)), manifests, retrieval, classes_all,
                                    filters)
        with report.atomic_path(Path(a.out_yield)) as tmp:
            yields.to_csv(tmp, index=False)
        notes += report.yield_note(yields)
    report.write_report(table, Path(a.out_csv), Path(a.out_md), Path(a.out_html) if a.out_html else None,
                        Path(a.out_method_cost) if a.out_method_cost else None, notes)
    if a.out_plot:
        report.plot_accuracy_vs_naug(table, Path(a.out_plot))
    if a.grid:
        classes_doc = json.loads(Path(a.classes).read_text())
        classes = [(k, classes_doc["names"].get(k, k)) for k in classes_doc["classes"][: a.grid_classes]]
        real = pd.read_parquet(a.real_table)
        for method, manifest, out in a.grid:
            report.image_grid(method, real, Path(a.root), Path(manifest), classes, a.grid_images, Path(out))
    print(Path(a.out_md).read_text())
    return {"rows": len(table)}


def parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per stage, each declared with `@command` on the function it runs."""
    p = argparse.ArgumentParser(prog="python -m augbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, fn, args) in COMMANDS.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        for add in args:
            add(s)
        s.set_defaults(fn=fn)
    return p


def cpu_seconds() -> float:
    """User + system CPU of this process (every thread, imports included) and of its finished children.

    Logged on the closing line of every command, where the report reads it: Snakemake's `benchmark:`
    samples a job every 0.5 s for about 15 s, then every 30 s, and keeps the last sample, so a 35-s
    job's CPU was recorded as 15 s.
    """
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    """Parse, log the command, run it, log the result and the elapsed time."""
    args = parser().parse_args(argv)
    # scancel and Snakemake stop a job with SIGTERM: exit through Python so that the atomic writers'
    # cleanup runs and no temporary file is left beside the outputs
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=os.environ.get("AUGBENCH_LOG", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "device", None):  # read by augbench.device.pick_device wherever the command picks its device
        os.environ["AUGBENCH_DEVICE"] = args.device
    threads = getattr(args, "threads", None)
    if threads:  # before torch or faiss is imported: both size their thread pools from these at start
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
    started = time.time()
    # the Slurm allocation a job ran in: the report counts a group allocation's GPU time once, split among its jobs
    alloc = f" [slurm job {os.environ['SLURM_JOB_ID']}]" if os.environ.get("SLURM_JOB_ID") else ""
    log.info("augbench %s %s%s", args.command, " ".join(sys.argv[2:] if argv is None else argv[1:]), alloc)
    try:
        result = args.fn(args)
    except (ValueError, OSError) as exc:  # bad input, a missing or unreadable file: one line that names it
        log.error("%s: %s", args.command, exc)
        return 2
    except RuntimeError as exc:
        if type(exc).__name__ != "GPUUnavailable":
            raise
        log.error("%s: %s", args.command, exc)
        return 3
    log.info("augbench %s done in %.1fs (cpu %.1fs): %s", args.command, time.time() - started, cpu_seconds(), result)
    return 0
