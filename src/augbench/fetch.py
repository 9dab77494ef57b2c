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

import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from augbench.copies import is_copy, trim_borders
from augbench.download import cache_key, download_urls, downloaded, failure_reason, sample_url
from augbench.imaging import UndecodableImage, open_rgb
from augbench.io import atomic_path, write_json, write_meta, write_parquet
from augbench.pool import PoolPart, gather
from augbench.shards import Sample, iter_shard, with_pointers, write_shard
from augbench.specs import DownloadSpec, FetchSpec, spec_dict

log = logging.getLogger(__name__)

class YieldError(RuntimeError):
    """Some classes got fewer good images than `min_yield × n_aug`."""


def download_candidates(neighbors: Path, out: Path, cache: Path, download_spec: DownloadSpec, processes: int = 1,
                        shard_size: int = 10000, thread_count: int = 16) -> dict[str, object]:
    """The download half of fetch (a CPU job: img2dataset): every candidate url of `neighbors.parquet` into the url cache,
    and `out`, one row per url: `status` ("success" or the failure reason), the cache `tar` and member `key` holding
    the image, and the `sha256` of its bytes (what the content check's cache is keyed by)."""
    started = time.time()
    urls = sorted(set(pd.read_parquet(neighbors, columns=["url"])["url"].astype(str)))
    folder = cache / cache_key(download_spec)
    stats = download_urls(urls, folder, download_spec, shard_size, processes, thread_count)
    status, where = downloaded(folder)
    wanted = set(urls)
    found: dict[str, tuple[str, str]] = {}
    for tar in sorted(set(where.values())):
        for sample in iter_shard(tar):
            url = sample_url(sample.record)
            if url in wanted and where.get(url) == tar:
                found[url] = (sample.key, hashlib.sha256(sample.image).hexdigest())
    rows = []
    for url in urls:
        st, err = status.get(url, ("not_attempted", ""))
        ok = st == "success" and url in found
        rows.append({"url": url, "status": "success" if ok else ("not_attempted" if st == "not_attempted" else failure_reason(err)),
                     "tar": str(where[url]) if ok else "", "key": found[url][0] if ok else "", "sha256": found[url][1] if ok else ""})
    write_parquet(out, pd.DataFrame(rows, columns=["url", "status", "tar", "key", "sha256"]))
    stats = {**stats, "urls": len(urls), "downloaded": sum(r["status"] == "success" for r in rows)}
    write_meta(out, "download_retrieved", spec_dict(download_spec), started, stats=stats)
    return stats


def fetch(neighbors: Path, out_tar: Path, out_manifest: Path, out_stats: Path, n_aug: int, spec: FetchSpec, class_names: list[str],
          shards: list[Path] | None = None, cache: Path | None = None, download_spec: DownloadSpec | None = None,
          model: str | Path | None = None, parts: list[PoolPart] | None = None, processes: int = 1,
          shard_size: int = 10000, thread_count: int = 16, downloads: Path | None = None,
          check: CheckSettings | None = None) -> dict[str, object]:
    """Collect the first `n_aug` good images per class of `neighbors.parquet` into `out_tar`.

    A remote pool's images come from `downloads` (the table `download_candidates` wrote, in a job of its own on a CPU
    node); without one they are downloaded here first. `check` says where and how the content check runs CLIP.
    """
    started = time.time()
    table = pd.read_parquet(neighbors).sort_values(["label", "rank"], kind="stable").reset_index(drop=True)
    table["key"] = table["key"].astype(str)
    verdict: dict[int, str] = {}  # row of `table` -> "ok" or a failure reason
    images: dict[int, tuple[Path, str]] = {}  # row -> (tar, member key) of its image
    dl_stats: dict[str, object] = {}
    if shards:
        for part in sorted(table["part"].unique()):
            wanted = {k: i for i, k in zip(table.index[table["part"] == part], table.loc[table["part"] == part, "key"], strict=True)}
            for s in iter_shard(shards[int(part)]):
                if s.key in wanted:
                    verdict[wanted[s.key]] = "ok"
                    images[wanted[s.key]] = (shards[int(part)], s.key)
        for i in table.index.difference(list(verdict)):
            verdict[i] = "missing_from_shard"
    else:
        if downloads is None:
            if cache is None or download_spec is None:
                raise ValueError("fetch: a remote pool needs a url cache folder and the download settings (or a downloads table)")
            downloads = Path(out_stats).with_name(Path(out_stats).stem + ".downloads.parquet")
            dl_stats = download_candidates(neighbors, downloads, cache, download_spec, processes, shard_size, thread_count)
        got = pd.read_parquet(downloads).set_index("url")
        by_url: dict[str, list[int]] = {}
        for i, url in zip(table.index, table["url"].astype(str), strict=True):
            status = got.at[url, "status"] if url in got.index else "not_attempted"
            if status != "success":
                verdict[i] = status
            else:
                by_url.setdefault(url, []).append(i)
        _check_downloads(table, by_url, got, verdict, images, spec, model, parts, check or CheckSettings())
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


CHECK_VIEW = "letterbox-trimmed-1"  # what the content check embeds (the image inside img2dataset's letterbox): part of the cache key


@dataclass(frozen=True)
class CheckSettings:
    """Where and how the content check runs CLIP: scheduling, never part of the spec (the verdicts do not change).

    `device`: auto | cuda | cpu (the embed rules' setting); `precision`: fp16 runs CLIP in half precision on a GPU (fp32
    on a CPU), as the embed rules do; `batch_size`: images per CLIP call; `cache`: the folder of embeddings keyed by
    the sha256 of the downloaded bytes, shared by both retrieval modes and every rerun, so an image is embedded once."""

    device: str | None = None
    precision: str = "fp32"
    batch_size: int = 256
    cache: Path | None = None


class EmbeddingCache:
    """CLIP embeddings of downloaded images by the sha256 of their bytes, one folder per (model content, dtype).

    Each job adds one pair of files (`part-*.npy` float16 vectors, `part-*.parquet` sha256 -> row; row -1 marks bytes
    that did not decode), written atomically: a killed job loses only its own additions, and concurrent jobs never
    write the same file. Reading keeps the sha index in memory (about 100 bytes per image) and memory-maps the vectors.
    """

    def __init__(self, root: Path, model: str | Path, dtype: str) -> None:
        from augbench.io import content_id

        self.folder = Path(root) / hashlib.sha256(f"{content_id(model)}:{dtype}".encode()).hexdigest()[:16]
        self.index: dict[str, tuple[int, int]] = {}
        self.files: list[Path] = []
        for meta in sorted(self.folder.glob("part-*.parquet")):
            vec = meta.with_suffix(".npy")
            if not vec.exists():
                continue
            t = pd.read_parquet(meta)
            for sha, row in zip(t["sha256"], t["row"], strict=True):
                self.index[str(sha)] = (len(self.files), int(row))
            self.files.append(vec)
        self._maps: dict[int, np.ndarray] = {}
        self.new: dict[str, np.ndarray | None] = {}

    def get(self, sha: str) -> np.ndarray | bool | None:
        """The cached vector; None for bytes that did not decode; False when not cached."""
        if sha in self.new:
            return self.new[sha]
        if sha not in self.index:
            return False
        f, row = self.index[sha]
        if row < 0:
            return None
        if f not in self._maps:
            self._maps[f] = np.load(self.files[f], mmap_mode="r")
        return np.asarray(self._maps[f][row], dtype=np.float32)

    def put(self, sha: str, vector: np.ndarray | None) -> None:
        self.new[sha] = vector

    def save(self) -> int:
        """Write this job's additions as one new part; returns how many."""
        if not self.new:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{len(self.files)}"
        good = [(sha, v) for sha, v in self.new.items() if v is not None]
        vectors = np.stack([v for _, v in good]).astype(np.float16) if good else np.zeros((0, 1), np.float16)
        with atomic_path(self.folder / f"{name}.npy") as tmp:
            np.save(tmp, vectors)
        rows = {sha: i for i, (sha, _) in enumerate(good)}
        write_parquet(self.folder / f"{name}.parquet",
                      pd.DataFrame({"sha256": list(self.new), "row": [rows.get(sha, -1) for sha in self.new]}))
        return len(self.new)


def _check_downloads(table: pd.DataFrame, by_url: dict[str, list[int]], got: pd.DataFrame, verdict: dict[int, str],
                     images: dict[int, tuple[Path, str]], spec: FetchSpec, model: str | Path | None,
                     parts: list[PoolPart] | None, check: CheckSettings) -> None:
    """Content check (CLIP embedding vs the stored one) and leak confirmation, on the downloaded pixels, tar by tar.

    An image whose bytes were embedded before (this job, the other retrieval mode, an earlier run) is not embedded
    again, and is not even decoded unless it is a leak suspect."""
    clip, cached = None, None
    if spec.min_cosine is not None:
        if model is None or not parts:
            raise ValueError("fetch: the content check (fetch.min_cosine) needs the CLIP model and the pool parts")
        from augbench.device import pick_device
        from augbench.embed import Clip

        clip = Clip(model, pick_device(check.device), check.precision)
        if check.cache is not None:
            cached = EmbeddingCache(check.cache, model, f"{clip.device.type}:{clip.dtype}:{CHECK_VIEW}")
    has_suspects = "leak_suspects" in table.columns
    eval_cache: dict[Path, Image.Image] = {}
    counts = Counter()
    for tar in sorted({Path(t) for t in got.loc[list(by_url), "tar"]}):
        wanted = {str(got.at[url, "key"]): url for url in by_url if Path(got.at[url, "tar"]) == tar}
        batch: list[tuple[str, Image.Image]] = []
        vectors: dict[str, np.ndarray | None] = {}
        decoded: dict[str, Image.Image | None] = {}
        for s in iter_shard(tar):
            url = wanted.get(s.key)
            if url is None:
                continue
            sha = str(got.at[url, "sha256"])
            suspect = has_suspects and any(len(table.at[i, "leak_suspects"]) for i in by_url[url])
            known = cached.get(sha) if cached is not None else False
            if clip is not None and known is not False:
                vectors[sha] = known
                counts["from_cache"] += 1
            if clip is None or known is False or suspect:  # decoded unless its verdicts are all in the cache
                try:
                    decoded[url] = open_rgb(s.image, name=url)
                except UndecodableImage as exc:  # img2dataset re-encoded it, so this is rare: count it
                    log.warning("fetch: downloaded image does not decode: %s", exc)
                    decoded[url] = None
                    if cached is not None:
                        cached.put(sha, None)
                    vectors[sha] = None
                    continue
                if clip is not None and known is False:
                    # the pool's producer embedded the photo itself; img2dataset stored it letterboxed (resize_mode
                    # border, white bars) or centre-cropped: embed what is inside the bars, as the producer saw it
                    batch.append((sha, trim_borders(decoded[url], letterbox_only=True)))
                    if len(batch) >= check.batch_size:
                        _embed(clip, batch, vectors, cached, counts)
        _embed(clip, batch, vectors, cached, counts)
        _judge(table, wanted, got, by_url, verdict, images, spec, parts, vectors if clip is not None else None, decoded,
               eval_cache, tar)
    if cached is not None:
        cached.save()
    log.info("fetch: content check: %d embedded, %d from the cache", counts["embedded"], counts["from_cache"])


def _embed(clip: object, batch: list[tuple[str, Image.Image]], vectors: dict[str, np.ndarray | None],
           cached: EmbeddingCache | None, counts: Counter) -> None:
    """One CLIP call over a batch of (sha256, image); the vectors go to `vectors` and the cache. Empties the batch."""
    if not batch:
        return
    for (sha, _), v in zip(batch, clip.images([im for _, im in batch]), strict=True):  # type: ignore[attr-defined]
        if cached is not None:
            cached.put(sha, v)
        vectors[sha] = v
    counts["embedded"] += len(batch)
    batch.clear()


def _judge(table: pd.DataFrame, wanted: dict[str, str], got: pd.DataFrame, by_url: dict[str, list[int]], verdict: dict[int, str],
           images: dict[int, tuple[Path, str]], spec: FetchSpec, parts: list[PoolPart] | None,
           vectors: dict[str, np.ndarray | None] | None, decoded: dict[str, Image.Image | None],
           eval_cache: dict[Path, Image.Image], tar: Path) -> None:
    """Verdicts for one tar's candidates: undecodable_image, leaked, content_changed, or ok."""
    urls = [u for u in wanted.values() if u in by_url]
    cos = {}
    if vectors is not None and parts:
        good = [u for u in urls if vectors.get(str(got.at[u, "sha256"])) is not None]
        if good:
            rows = [by_url[u][0] for u in good]
            stored = gather(parts, table.loc[rows, "part"].to_numpy(), table.loc[rows, "row"].to_numpy())
            stored /= np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
            mine = np.stack([vectors[str(got.at[u, "sha256"])] for u in good])
            cos = dict(zip(good, np.sum(stored * mine, axis=1), strict=True))
    has_suspects = "leak_suspects" in table.columns
    for url in urls:
        key = str(got.at[url, "key"])
        undecodable = (vectors is not None and vectors.get(str(got.at[url, "sha256"]), 0) is None) or \
            (url in decoded and decoded[url] is None)
        for i in by_url[url]:
            suspects = table.at[i, "leak_suspects"] if has_suspects else None
            if undecodable:
                verdict[i] = "undecodable_image"
            # a leak first: a copy of an eval image is counted as one even when its embedding also moved
            elif suspects is not None and len(suspects) and is_copy(decoded[url], [Path(p) for p in suspects],
                                                                    spec.leak_pixel_mad, eval_cache):
                verdict[i] = "leaked"
            elif vectors is not None and spec.min_cosine is not None and cos.get(url, 1.0) < spec.min_cosine:
                verdict[i] = "content_changed"
            else:
                verdict[i] = "ok"
                images[i] = (tar, key)


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
