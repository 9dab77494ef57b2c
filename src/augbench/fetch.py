"""Materialise retrieved images: from the local pool shards, or with img2dataset when the pool is remote.

The result is one tar shard of the retrieved images (sample key = pool key) and a manifest
(key, class, label, rank, score, caption) that the classifier reads, taking the first `n_aug`
ranks per class.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from augbench.download import download_part
from augbench.io import write_meta, write_parquet
from augbench.shards import iter_shard, write_shard
from augbench.specs import DownloadSpec, spec_dict

log = logging.getLogger(__name__)


def fetch(neighbors: Path, out_tar: Path, out_manifest: Path, shards: list[Path] | None = None,
          cache: Path | None = None, download_spec: DownloadSpec | None = None) -> dict[str, int]:
    """Collect the images of `neighbors.parquet` into `out_tar`; rows that cannot be had are dropped and counted."""
    started = time.time()
    table = pd.read_parquet(neighbors)
    table["key"] = table["key"].astype(str)
    if shards:
        wanted = set(table["key"])
        by_shard = {Path(s).stem: Path(s) for s in shards}
        needed = sorted(set(table["shard"])) if "shard" in table.columns else sorted(by_shard)
        samples = {}
        for name in needed:
            if name not in by_shard:
                raise FileNotFoundError(f"{neighbors}: neighbours come from shard {name!r}, which is not among the given shards")
            for s in iter_shard(by_shard[name]):
                if s.key in wanted:
                    samples[s.key] = s
        ordered = [samples[k] for k in dict.fromkeys(table["key"]) if k in samples]
        write_shard(out_tar, ordered)
    else:
        if cache is None:
            raise ValueError("fetch: without local shards, a cache folder for the download is needed")
        urls = cache / "urls.parquet"
        write_parquet(urls, table.drop_duplicates("key")[["key", "url", "caption"]])
        download_part(urls, out_tar, cache / "status.parquet", cache / "stats.json", cache / "attempts",
                      download_spec or DownloadSpec())
        ordered = list(iter_shard(out_tar))
    have = {s.key for s in ordered}
    missing = int((~table["key"].isin(have)).sum())
    if missing:
        log.warning("fetch: %d of %d retrieved images could not be materialised and are dropped", missing, len(table))
    manifest = table[table["key"].isin(have)].copy()
    # ranks stay dense per class after drops, so `rank < n_aug` still yields n_aug images where possible
    manifest["rank"] = manifest.groupby("label").cumcount()
    write_parquet(out_manifest, manifest)
    stats = {"images": len(have), "missing": missing}
    write_meta(out_tar, "fetch", spec_dict(download_spec) if download_spec else {}, started, stats=stats)
    return stats
