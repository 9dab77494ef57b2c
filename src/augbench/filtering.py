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
from pathlib import Path

import numpy as np
import pandas as pd

from augbench.io import atomic_path, write_json, write_meta
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
        self.text = self.clip.texts([f"a photo of a {n}." for n in names])

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


def _scores(part: pd.DataFrame, folder: Path, scorer) -> np.ndarray:
    """The scorer's class scores (rows x classes) of one class's candidates; an undecodable image scores -inf."""
    from augbench.imaging import UndecodableImage

    out: np.ndarray | None = None
    names = (part["key"].astype(str) + " (" + part["shard"].astype(str) + ")").to_numpy()
    batch: list[tuple[int, bytes]] = []

    def flush() -> None:
        nonlocal out
        rows, data = [i for i, _ in batch], [d for _, d in batch]
        try:
            got = scorer(data, list(names[rows]))
        except UndecodableImage:  # score one by one: a broken candidate is dropped, not the batch
            got = None
            for i, d in batch:
                try:
                    one = scorer([d], [names[i]])
                except UndecodableImage as exc:
                    log.warning("filter: skipping undecodable candidate %s", exc)
                    continue
                if out is None:
                    out = np.full((len(part), one.shape[1]), -np.inf, dtype=np.float32)
                out[i] = one[0]
        if got is not None:
            if out is None:
                out = np.full((len(part), got.shape[1]), -np.inf, dtype=np.float32)
            out[rows] = got
        batch.clear()

    for i, data in read_pointed(part, folder):
        batch.append((i, data))
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    return out if out is not None else np.full((len(part), 1), -np.inf, dtype=np.float32)


def filter_set(candidates_manifest: Path, classes: Path, spec: FilterSpec, n_aug: int, out_manifest: Path,
               out_stats: Path, clip_model: str | Path | None = None, classifier: Path | None = None,
               out_fidelity: Path | None = None) -> dict[str, object]:
    """Keep, per class, what `spec` keeps of a row's candidates; write the filtered set's manifest (pointers into the
    candidates' shards, ranks renumbered in candidate order), its yield (`out_stats`) and, given, CLIP's zero-shot
    fidelity of the kept images (`out_fidelity`, as collect writes for a generated row).

    One class's candidates are scored at a time (`BATCH` images at once), so memory holds one class's scores.
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
    table = pd.read_parquet(candidates_manifest)
    src, dst = Path(candidates_manifest).parent, Path(out_manifest).parent
    kept_parts, per_class, fidelity = [], {}, {}
    for label, part in table.groupby("label", sort=True):
        part = part.sort_values("rank", kind="stable").reset_index(drop=True)
        label = int(label)
        scores = _scores(part, src, scorer)
        own = scores[:, label] if scores.shape[1] > label else np.full(len(part), -np.inf)
        decodable = np.isfinite(own)
        assigned = decodable & (np.argmax(scores, axis=1) == label)
        keep, passed = select(np.where(decodable, own, -np.inf), assigned, spec, n_aug)
        keep = keep[decodable[keep]]
        kept = part.iloc[keep].copy()
        kept["candidate_rank"] = kept["rank"].to_numpy()
        kept["filter_score"] = own[keep].astype(np.float64)
        kept["rank"] = np.arange(len(kept))
        kept_parts.append(kept)
        if out_fidelity is not None and len(kept):
            zs = scores[keep] if scorer is clip else _scores(kept.reset_index(drop=True), src, clip)
            fidelity[label] = (int((np.argmax(zs, axis=1) == label).sum()), len(kept))
        key = keys[label] if 0 <= label < len(keys) else str(label)
        per_class[key] = {"candidates": len(part), "passed": passed, "kept": len(kept),
                          "undecodable": int((~decodable).sum()), "short": max(0, n_aug - len(kept)),
                          "mean_score_kept": float(own[keep].mean()) if len(keep) else float("nan"),
                          "mean_score_all": float(own[decodable].mean()) if decodable.any() else float("nan")}
    out = pd.concat(kept_parts, ignore_index=True) if kept_parts else table.iloc[:0].assign(candidate_rank=[], filter_score=[])
    out = rebase(out, src, dst)
    with atomic_path(out_manifest) as tmp:
        out.to_parquet(tmp, index=False)
    n_cand = sum(v["candidates"] for v in per_class.values())
    result = {"filter": spec_dict(spec), "n_aug": n_aug, "candidates": n_cand, "kept": len(out),
              "yield": len(out) / n_cand if n_cand else float("nan"),
              "classes_short": sum(v["short"] > 0 for v in per_class.values()), "per_class": per_class}
    write_json(out_stats, result)
    if out_fidelity is not None:
        right, total = sum(r for r, _ in fidelity.values()), sum(t for _, t in fidelity.values())
        write_json(out_fidelity, {"generation_fidelity": right / total if total else float("nan"), "images": total,
                                  "per_class": {keys[c]: r / t for c, (r, t) in fidelity.items()}, "of": "kept images"})
    write_meta(out_manifest, "filter", spec_dict(spec), started, candidates=str(candidates_manifest),
               stats={"candidates": n_cand, "kept": len(out)})
    log.info("filter %s: kept %d of %d candidates (%.0f%%), %d class(es) short of %d", candidates_manifest, len(out),
             n_cand, 100 * result["yield"] if n_cand else 0, result["classes_short"], n_aug)
    return result
