"""Materialise retrieved images: from the local pool shards, or downloaded by url when the pool is remote.

Remote pools lose links: 30-50 % of LAION and DataComp urls are dead today, and some answer with
an HTTP-200 placeholder ("image no longer available"). So `neighbors.parquet` holds `n_aug ×
overfetch` ranked candidates per class, and fetch:

1. downloads the urls no earlier attempt has tried, with img2dataset, in shards of at most
   `shard_size` urls. A url cache keyed by the download settings that change pixels (not by
   process counts) is shared by both query modes; img2dataset writes a shard's `_stats.json`
   when the shard is complete, so a killed fetch keeps every completed shard and a rerun asks
   only for the urls not yet tried;
2. checks each downloaded image: one CLIP embedding, compared with the pool's stored embedding of
   that (part, row) — under `min_cosine` the content changed since the pool was embedded
   (`content_changed`); leak suspects nominated by the merge are confirmed on these pixels
   (`leaked`);
3. keeps the first `n_aug` good images per class in rank order; a class below `min_yield × n_aug`
   fails the job with the classes and their main failure reasons.

The result is one tar shard (sample key = pool key), a manifest (key, class, label, rank, score,
caption, url) that the classifier reads, and stats with failures counted by reason.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from augbench.copies import is_copy
from augbench.download import cache_key, download_urls, downloaded, failure_reason, sample_url
from augbench.imaging import UndecodableImage, open_rgb
from augbench.io import write_json, write_meta, write_parquet
from augbench.pool import PoolPart, gather
from augbench.shards import Sample, iter_shard, with_pointers, write_shard
from augbench.specs import DownloadSpec, FetchSpec, spec_dict

log = logging.getLogger(__name__)

class YieldError(RuntimeError):
    """Some classes got fewer good images than `min_yield × n_aug`."""


def fetch(neighbors: Path, out_tar: Path, out_manifest: Path, out_stats: Path, n_aug: int, spec: FetchSpec, class_names: list[str],
          shards: list[Path] | None = None, cache: Path | None = None, download_spec: DownloadSpec | None = None,
          model: str | Path | None = None, parts: list[PoolPart] | None = None, processes: int = 1,
          shard_size: int = 10000, thread_count: int = 16) -> dict[str, object]:
    """Collect the first `n_aug` good images per class of `neighbors.parquet` into `out_tar`."""
    started = time.time()
    table = pd.read_parquet(neighbors).sort_values(["label", "rank"], kind="stable").reset_index(drop=True)
    table["key"] = table["key"].astype(str)
    verdict: dict[int, str] = {}  # row of `table` -> "ok" or a failure reason
    images: dict[int, tuple[Path, str]] = {}  # row -> (tar, member key) of its image
    if shards:
        for part in sorted(table["part"].unique()):
            wanted = {k: i for i, k in zip(table.index[table["part"] == part], table.loc[table["part"] == part, "key"], strict=True)}
            for s in iter_shard(shards[int(part)]):
                if s.key in wanted:
                    verdict[wanted[s.key]] = "ok"
                    images[wanted[s.key]] = (shards[int(part)], s.key)
        for i in table.index.difference(list(verdict)):
            verdict[i] = "missing_from_shard"
        dl_stats: dict[str, object] = {}
    else:
        if cache is None or download_spec is None:
            raise ValueError("fetch: a remote pool needs a url cache folder and the download settings")
        folder = cache / cache_key(download_spec)
        dl_stats = download_urls(list(table["url"].astype(str)), folder, download_spec, shard_size, processes, thread_count)
        status, where = downloaded(folder)
        by_url: dict[str, list[int]] = {}
        for i, url in zip(table.index, table["url"].astype(str), strict=True):
            s, err = status.get(url, ("not_attempted", ""))
            if s != "success":
                verdict[i] = failure_reason(err) if s != "not_attempted" else "not_attempted"
            else:
                by_url.setdefault(url, []).append(i)
        _check_downloads(table, by_url, where, verdict, images, spec, model, parts)
    _settle_conflicts(table, verdict, images)
    # the first n_aug good images per class, in rank order; the same image twice in one class is used once
    used: set[tuple[Path, str]] = set()
    keep: list[int] = []
    reasons = {label: Counter() for label in range(len(class_names))}
    for label, idx in table.groupby("label").indices.items():
        n = 0
        for i in idx:
            if n >= n_aug:
                break
            v = verdict.get(int(i), "not_attempted")
            if v == "ok" and images[int(i)] in used:
                v = "duplicate_image"
            if v != "ok":
                reasons[int(label)][v] += 1
                continue
            used.add(images[int(i)])
            keep.append(int(i))
            n += 1
    manifest = table.loc[keep].copy()
    manifest["rank"] = manifest.groupby("label").cumcount()
    achieved = manifest.groupby("label").size()
    classes = pd.Series(class_names, index=range(len(class_names)))  # every class, those without a candidate too
    achieved = achieved.reindex(classes.index, fill_value=0)
    floor = spec.min_yield * n_aug
    for label, n in achieved.items():  # short of n_aug: every candidate was looked at; the count is the shortfall
        if n < n_aug:
            reasons[int(label)]["candidates_exhausted"] = int(n_aug - n)
    short = achieved[achieved < floor]
    counts = Counter(v for v in verdict.values())
    stats = {"n_aug": n_aug, "images": len(manifest), "achieved_min": int(achieved.min()) if len(achieved) else 0,
             "achieved_median": float(achieved.median()) if len(achieved) else 0.0,
             "candidates": len(table), "by_reason": dict(sorted(counts.items())), **dl_stats,
             # copies of val/test images confirmed on the downloaded pixels, over every candidate (the merge's own are in
             # retrieve/<mode>/stats.json): the report adds both
             "leaked_removed": int(counts.get("leaked", 0)),
             "leaked_per_class": {str(classes[int(label)]): int(n) for label, n in
                                  table.loc[[i for i, v in verdict.items() if v == "leaked"], "label"].value_counts().items()},
             "per_class": {str(classes[label]): int(n) for label, n in achieved.items()},
             # why each class lost the candidates it looked at (every class, not only the short ones): the report's yield.csv
             "per_class_reasons": {str(classes[label]): dict(sorted(reasons[int(label)].items())) for label in classes.index}}
    if len(short):
        write_json(out_stats, stats)
        raise YieldError(f"fetch: {len(short)} class(es) below the yield floor {floor:g} of n_aug {n_aug} "
                         f"(fetch.min_yield {spec.min_yield}): "
                         + "; ".join(f"{classes[label]} ({int(n)}: {_why(reasons[int(label)])})" for label, n in short.items())
                         + f"; failures over all candidates: {dict(counts.most_common(5))}")
    _write_images(manifest, images, out_tar)
    cols = [c for c in ("class", "label", "rank", "key", "url", "caption", "score", "part", "row", "query") if c in manifest.columns]
    # pointers (shard, offset, size) into the tar: the classifier and the grids seek to the images they read
    write_parquet(out_manifest, with_pointers(manifest[cols].reset_index(drop=True), out_tar, Path(out_manifest).parent))
    write_json(out_stats, stats)
    write_meta(out_tar, "fetch", spec_dict(spec), started, stats={k: v for k, v in stats.items() if k != "per_class"})
    log.info("fetch: %d images (per class min %d, median %.0f of n_aug %d) from %d candidates; %s",
             len(manifest), stats["achieved_min"], stats["achieved_median"], n_aug, len(table), stats["by_reason"])
    return stats


def _why(reasons: Counter) -> str:
    """A class's failure reasons, most frequent first."""
    return ", ".join(f"{r} {c}" for r, c in reasons.most_common()) or "no failures"


def _settle_conflicts(table: pd.DataFrame, verdict: dict[int, str], images: dict[int, tuple[Path, str]]) -> None:
    """One image good for several classes goes to the class where it scores highest (ties: the lower label), the rule
    the merge applies to pool items; every other class's row becomes `conflict` and that class backfills from its
    next candidates. The merge has already settled (part, row); what is left is one url (one download) behind
    several pool rows, which LAION and DataComp both have."""
    owner: dict[tuple[Path, str], tuple[float, int]] = {}
    for i, v in verdict.items():
        if v == "ok":
            score, label = float(table.at[i, "score"]), int(table.at[i, "label"])
            best = owner.get(images[i])
            if best is None or (score, -label) > (best[0], -best[1]):
                owner[images[i]] = (score, label)
    for i, v in verdict.items():
        if v == "ok" and owner[images[i]][1] != int(table.at[i, "label"]):
            verdict[i] = "conflict"


def _check_downloads(table: pd.DataFrame, by_url: dict[str, list[int]], where: dict[str, Path], verdict: dict[int, str],
                     images: dict[int, tuple[Path, str]], spec: FetchSpec, model: str | Path | None,
                     parts: list[PoolPart] | None) -> None:
    """Content check (CLIP embedding vs the stored one) and leak confirmation, on the downloaded pixels, tar by tar."""
    clip = None
    if spec.min_cosine is not None:
        if model is None or not parts:
            raise ValueError("fetch: the content check (fetch.min_cosine) needs the CLIP model and the pool parts")
        from augbench.embed import Clip

        clip = Clip(model)
    eval_cache: dict[Path, Image.Image] = {}
    for tar in sorted(set(where.values())):
        batch: list[tuple[list[int], Sample, object]] = []
        for s in iter_shard(tar):
            url = sample_url(s.record)
            if url not in by_url or where.get(url) != tar:
                continue
            try:
                image = open_rgb(s.image, name=url)  # decoded once: the content check embeds this image
            except UndecodableImage as exc:  # img2dataset re-encoded it, so this is rare: count it
                log.warning("fetch: downloaded image does not decode: %s", exc)
                for i in by_url[url]:
                    verdict[i] = "undecodable_image"
                continue
            batch.append((by_url[url], s, image))
            if len(batch) >= 256:
                _judge(batch, tar, table, verdict, images, spec, clip, parts, eval_cache)
                batch = []
        _judge(batch, tar, table, verdict, images, spec, clip, parts, eval_cache)


def _judge(batch: list[tuple[list[int], Sample, object]], tar: Path, table: pd.DataFrame, verdict: dict[int, str],
           images: dict[int, tuple[Path, str]], spec: FetchSpec, clip: object | None, parts: list[PoolPart] | None,
           eval_cache: dict[Path, Image.Image]) -> None:
    """Verdicts for one batch of downloaded images: content_changed, leaked, or ok."""
    if not batch:
        return
    if clip is not None and parts:
        rows = [ids[0] for ids, _, _ in batch]
        stored = gather(parts, table.loc[rows, "part"].to_numpy(), table.loc[rows, "row"].to_numpy())
        stored /= np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
        got = clip.images([image for _, _, image in batch])  # type: ignore[attr-defined]
        cos = np.sum(stored * got, axis=1)
    else:
        cos = np.ones(len(batch))
    has_suspects = "leak_suspects" in table.columns
    for (ids, s, image), c in zip(batch, cos, strict=True):
        for i in ids:
            suspects = table.at[i, "leak_suspects"] if has_suspects else None
            # a leak first: a copy of an eval image is counted as one even when its embedding also moved
            if suspects is not None and len(suspects) and is_copy(image, [Path(p) for p in suspects], spec.leak_pixel_mad,
                                                                   eval_cache):
                verdict[i] = "leaked"
            elif spec.min_cosine is not None and c < spec.min_cosine:
                verdict[i] = "content_changed"
            else:
                verdict[i] = "ok"
                images[i] = (tar, s.key)


def _write_images(manifest: pd.DataFrame, images: dict[int, tuple[Path, str]], out_tar: Path) -> None:
    """Stream the kept images into one shard (sample key = pool key), reading each source tar once."""
    wanted: dict[Path, dict[str, list[int]]] = {}
    for i in manifest.index:
        tar, key = images[int(i)]
        wanted.setdefault(tar, {}).setdefault(key, []).append(int(i))

    def samples():
        for tar in sorted(wanted):
            for s in iter_shard(tar):
                for i in wanted[tar].get(s.key, []):
                    row = manifest.loc[i]
                    yield Sample(str(row["key"]), s.image, s.ext, str(row["caption"]),
                                 {"key": str(row["key"]), "url": row["url"], "class": row["class"]})

    write_shard(out_tar, samples())
