"""Filtering an augmentation set: a filtered row keeps the candidates a scorer rates as their class.

Peers filter generated images before training on them (a CLIP score against the class prompt; a classifier trained on
the real shots), and a filter is worth a row of its own in the table: `<row>+<filter>` trains on the kept images of
its row's candidates, so the table shows the filter's effect beside the unfiltered row.

The candidates are the row's own images, over-generated (or over-fetched): `candidates(spec, n)` per class for the
largest n_aug. Generated candidates share the unfiltered row's chunk cache (the first images are the same bytes), so
filtering costs the extra images and the scoring, not a second generation.

Which images a run with n_aug trains on: the kept ones in candidate order, ranked 0, 1, ... per class, and a run
takes ranks < n_aug (as for every set). Kept are those
- at or above `threshold`, in candidate order (over-generation reaches n_aug when enough pass); or
- the best `top_fraction` of the class's candidates (the best n_aug of n_aug / top_fraction), re-put in candidate
  order, so a smaller n_aug takes the first of them, each still from the top fraction; or
- (neither) those the scorer assigns to their own class (argmax over the classes).

A class short of n_aug after filtering is reported with the other shortfalls (reason `filtered_out`); `filter.json`
holds each class's candidates, passed and kept images (the yield).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from augbench.io import parquet_appender, write_json, write_meta
from augbench.prompts import CLASSNAME
from augbench.shards import read_pointed, rebase
from augbench.specs import FilterSpec, spec_dict

log = logging.getLogger(__name__)

BATCH = 256  # images scored at once


def candidates(spec: FilterSpec, n: int) -> int:
    """Candidates per class for a filtered row whose largest n_aug is `n`."""
    if spec.top_fraction is not None:
        return math.ceil(n / spec.top_fraction - 1e-9)
    return math.ceil(n * spec.overgenerate - 1e-9)


def select(score: np.ndarray, assigned: np.ndarray, spec: FilterSpec, n: int) -> tuple[np.ndarray, int]:
    """(positions kept, in candidate order, at most `n`; how many passed) of one class's candidates in candidate order.

    `score` is the scorer's figure for the image's own class, `assigned` whether its argmax is that class."""
    if spec.threshold is not None:
        passed = score >= spec.threshold
    elif spec.top_fraction is not None:  # the best share of what the class got (fewer candidates: fewer kept)
        k = min(n, math.floor(len(score) * spec.top_fraction + 0.5))
        passed = np.zeros(len(score), dtype=bool)
        passed[np.argsort(-score, kind="stable")[:k]] = True
    else:
        passed = np.asarray(assigned, dtype=bool)
    return np.flatnonzero(passed)[:n], int(passed.sum())


class _Clip:
    """Cosine of each image with every class prompt (the prompt collect's fidelity uses)."""

    def __init__(self, model: str | Path, names: list[str]) -> None:
        from augbench.embed import Clip

        self.clip = Clip(model)
        self.text = self.clip.texts([CLASSNAME.format(n) for n in names])

    def __call__(self, images: list[bytes], names: list[str]) -> np.ndarray:
        from augbench.imaging import open_rgb

        return self.clip.images([open_rgb(d, name=n) for d, n in zip(images, names, strict=True)]) @ self.text.T


class _Classifier:
    """Class probabilities of the classifier trained on the real shots, on images decoded as it was trained."""

    def __init__(self, ckpt: Path, n_classes: int) -> None:
        from augbench.classify import load_classifier

        self.model, self.spec, self.device = load_classifier(ckpt, n_classes)
        self.size = self.spec.load_size or self.spec.input_size

    def __call__(self, images: list[bytes], names: list[str]) -> np.ndarray:
        from augbench.classify import predict_logits
        from augbench.imaging import decode

        x = np.stack([decode(d, self.size, name=n, fit="crop") for d, n in zip(images, names, strict=True)])
        return predict_logits(self.model, x, self.device, self.spec).softmax(dim=1).numpy()


def _scores(part: pd.DataFrame, folder: Path, scorer, n_classes: int) -> np.ndarray:
    """The scorer's class scores (rows x classes) of one class's candidates; an undecodable image scores -inf."""
    from augbench.imaging import UndecodableImage

    out = np.full((len(part), n_classes), -np.inf, dtype=np.float32)
    names = (part["key"].astype(str) + " (" + part["shard"].astype(str) + ")").to_numpy()
    batch: list[tuple[int, bytes]] = []

    def flush() -> None:
        rows, data = [i for i, _ in batch], [d for _, d in batch]
        try:
            out[rows] = scorer(data, list(names[rows]))
        except UndecodableImage:  # score one by one: a broken candidate is dropped, not the batch
            for i, d in batch:
                try:
                    out[i] = scorer([d], [names[i]])[0]
                except UndecodableImage as exc:
                    log.warning("filter: skipping undecodable candidate %s", exc)
        batch.clear()

    for i, data in read_pointed(part, folder):
        batch.append((i, data))
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    return out


def class_parts(manifest: Path) -> Iterator[pd.DataFrame]:
    """A manifest's rows one class at a time, each in rank order. A manifest written class by class (collect's) is
    streamed, so memory holds one class's rows; one whose classes are interleaved (fetch's, which its own job held
    whole) is read whole and grouped."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(manifest)
    labels = file.read(columns=["label"]).column(0).to_numpy()
    starts = np.flatnonzero(np.diff(labels)) + 1  # where the label changes
    if len(np.unique(labels)) != len(starts) + (len(labels) > 0):
        for _, part in pd.read_parquet(manifest).groupby("label", sort=True):
            yield part.sort_values("rank", kind="stable").reset_index(drop=True)
        return
    pending: list[pd.DataFrame] = []
    for batch in file.iter_batches(batch_size=4096):
        frame = batch.to_pandas()
        cuts = np.flatnonzero(np.diff(frame["label"].to_numpy())) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(frame)], strict=True):
            piece = frame.iloc[a:b]
            if pending and pending[0]["label"].iat[0] != piece["label"].iat[0]:
                yield pd.concat(pending).sort_values("rank", kind="stable").reset_index(drop=True)
                pending = []
            pending.append(piece)
    if pending:
        yield pd.concat(pending).sort_values("rank", kind="stable").reset_index(drop=True)


def filter_set(candidates_manifest: Path, classes: Path, spec: FilterSpec, n_aug: int, out_manifest: Path,
               out_stats: Path, clip_model: str | Path | None = None, classifier: Path | None = None,
               out_fidelity: Path | None = None) -> dict[str, object]:
    """Keep, per class, what `spec` keeps of a row's candidates; write the filtered set's manifest (pointers into the
    candidates' shards, ranks renumbered in candidate order), its yield (`out_stats`) and, given, CLIP's zero-shot
    fidelity of the kept images (`out_fidelity`, as collect writes for a generated row).

    One class's candidates are read, scored (`BATCH` images at once) and written at a time (`class_parts`).
    """
    started = time.time()
    info = json.loads(Path(classes).read_text())
    keys = list(info["classes"])
    names = [info["names"][k] for k in keys]
    if spec.score == "classifier" and classifier is None:
        raise ValueError("filter: score classifier needs the real-shot classifier's checkpoint")
    if (spec.score == "clip" or out_fidelity is not None) and clip_model is None:
        raise ValueError("filter: score clip (and fidelity) need a CLIP model")
    clip = _Clip(clip_model, names) if clip_model is not None and (spec.score == "clip" or out_fidelity) else None
    scorer = clip if spec.score == "clip" else _Classifier(Path(classifier), len(keys))
    src, dst = Path(candidates_manifest).parent, Path(out_manifest).parent
    per_class, fidelity, n_kept = {}, {}, 0
    with parquet_appender(out_manifest) as append:  # written atomically when every class is in
        for part in class_parts(candidates_manifest):
            label = int(part["label"].iat[0])
            if not 0 <= label < len(keys):
                raise ValueError(f"{candidates_manifest}: label {label} is no class of {classes} ({len(keys)} classes)")
            scores = _scores(part, src, scorer, len(keys))
            own = scores[:, label]
            decodable = np.isfinite(own)
            assigned = decodable & (np.argmax(scores, axis=1) == label)
            keep, passed = select(own, assigned, spec, n_aug)  # an undecodable candidate scores -inf
            keep = keep[decodable[keep]]
            kept = part.iloc[keep].copy()
            kept["candidate_rank"] = kept["rank"].to_numpy()
            kept["filter_score"] = own[keep].astype(np.float64)
            kept["rank"] = np.arange(len(kept))
            append(rebase(kept, src, dst))
            n_kept += len(kept)
            if out_fidelity is not None and len(kept):
                zs = scores[keep] if scorer is clip else _scores(kept.reset_index(drop=True), src, clip, len(keys))
                fidelity[label] = (int((np.argmax(zs, axis=1) == label).sum()), len(kept))
            per_class[keys[label]] = {"candidates": len(part), "passed": passed, "kept": len(kept),
                              "undecodable": int((~decodable).sum()), "short": max(0, n_aug - len(kept)),
                              "mean_score_kept": float(own[keep].mean()) if len(keep) else float("nan"),
                              "mean_score_all": float(own[decodable].mean()) if decodable.any() else float("nan")}
        if not per_class:  # no candidate at all: an empty set with the candidates' columns
            append(pd.read_parquet(candidates_manifest).assign(candidate_rank=[], filter_score=[]))
    n_cand = sum(v["candidates"] for v in per_class.values())
    result = {"filter": spec_dict(spec), "n_aug": n_aug, "candidates": n_cand, "kept": n_kept,
              "yield": n_kept / n_cand if n_cand else float("nan"),
              "classes_short": sum(v["short"] > 0 for v in per_class.values()), "per_class": per_class}
    write_json(out_stats, result)
    if out_fidelity is not None:
        right, total = sum(r for r, _ in fidelity.values()), sum(t for _, t in fidelity.values())
        write_json(out_fidelity, {"generation_fidelity": right / total if total else float("nan"), "images": total,
                                  "per_class": {keys[c]: r / t for c, (r, t) in fidelity.items()}, "of": "kept images"})
    write_meta(out_manifest, "filter", spec_dict(spec), started, candidates=str(candidates_manifest),
               stats={"candidates": n_cand, "kept": n_kept})
    log.info("filter %s: kept %d of %d candidates (%.0f%%), %d class(es) short of %d", candidates_manifest, n_kept,
             n_cand, 100 * result["yield"] if n_cand else 0, result["classes_short"], n_aug)
    return result
