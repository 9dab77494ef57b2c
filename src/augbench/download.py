"""Download a url/caption pool part with img2dataset, resumably, counting failures by reason.

Downloads go into a url cache that is not a Snakemake output: `<cache>/<hash of the download
settings>/attempt_*/`, one img2dataset run per attempt, in shards whose `_stats.json` marks them
complete. Entries are keyed by url (a served file by its path and the hash of its bytes), never by
row position, so a rerun asks only for the urls no attempt fetched, nothing fetched is lost when
Snakemake deletes a part's outputs before re-running it, and a changed url list, world or setting
never assembles a shard from another image. Pool download and fetch share this code.

For the toy world, `serve_directory` serves the generated pool on 127.0.0.1 for the duration of
the download; the part's urls are then paths relative to that server.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import http.server
import itertools
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from augbench.io import atomic_path, write_json, write_meta, write_parquet
from augbench.shards import Sample, iter_shard, write_shard
from augbench.specs import DownloadSpec, canonical_json, spec_dict

log = logging.getLogger(__name__)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static file handler that logs through `logging` instead of stderr."""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("serve: " + format, *args)


@contextlib.contextmanager
def serve_directory(root: str | Path) -> Iterator[str]:
    """Serve `root` over HTTP on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def failure_reason(message: str | None) -> str:
    """Map img2dataset's free-text error to a small set of countable reasons."""
    text = (message or "").lower()
    m = re.search(r"http error (\d{3})", text)
    if m:
        return f"http_{m.group(1)}"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "decod" in text or "cannot identify" in text or "truncated" in text:
        # img2dataset reports a non-image body and a truncated JPEG alike ("Image decoding error")
        return "undecodable_image"
    if "connection" in text or "refused" in text or "reset" in text or "remote end closed" in text:
        return "connection_error"
    if "size" in text or "aspect" in text:
        return "filtered_size"
    return "other"


def run_img2dataset(rows: pd.DataFrame, folder: Path, spec: DownloadSpec, shard_size: int | None = None,
                    processes: int = 1, thread_count: int = 16) -> None:
    """One img2dataset call on `rows` (columns key, url, caption, optional origin_url) into `folder`/out (webdataset).

    `shard_size` urls per output shard (default: one shard); `processes` img2dataset worker processes
    and `thread_count` threads each (scheduling, not settings). `origin_url` (a cache identity) is carried through to
    the status table and each sample's json. img2dataset writes a shard's `_stats.json` once the shard is
    complete, which is what a resumed fetch reads to know which urls were tried.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download as i2d_download

    folder.mkdir(parents=True, exist_ok=True)
    urls = folder / "urls.parquet"
    # img2dataset reserves the name `key` for its own sample ids: carry ours as `pool_key`.
    cols = ["key", "url", "caption"] + (["origin_url"] if "origin_url" in rows.columns else [])
    rows[cols].rename(columns={"key": "pool_key"}).to_parquet(urls, index=False)
    i2d_download(
        url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
        save_additional_columns=["pool_key", *cols[3:]], output_format="webdataset", output_folder=str(folder / "out"),
        image_size=spec.image_size, resize_mode=spec.resize_mode, encode_format=spec.encode_format,
        encode_quality=spec.encode_quality, processes_count=processes, thread_count=thread_count,
        timeout=spec.timeout, retries=spec.retries, number_sample_per_shard=max(shard_size or len(rows), 1),
        # the folder is always fresh; "overwrite" would delete the _tmp folder img2dataset has just made
        enable_wandb=False, distributor="multiprocessing", incremental_mode="incremental", compute_hash="sha256",
        extract_exif=False,
    )
    if not list((folder / "out").glob("*.parquet")):
        raise RuntimeError(f"download: img2dataset wrote no status parquet in {folder / 'out'} (all workers failed?)")


# Bump when the cache's layout or what its key covers changes: old entries are then simply not found.
CACHE_LAYOUT = 2


def cache_key(spec: DownloadSpec) -> str:
    """A url cache's folder name: a hash of the download settings, all of which change pixels (process and thread
    counts are not settings: they are not in the spec)."""
    data = {"layout": CACHE_LAYOUT, **spec_dict(spec)}
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:16]


def served_identity(root: Path, rel: str) -> str:
    """A served file's cache identity: its path and the hash of its bytes.

    A served folder's paths are row numbers that a new world reuses for other images; keyed by
    path alone, a rebuilt world would be assembled from the old world's pictures.
    """
    return f"{rel}#sha256={hashlib.sha256((root / rel.lstrip('/')).read_bytes()).hexdigest()[:16]}"


def sample_url(record: dict[str, object]) -> str:
    """The cache identity img2dataset carried through for a sample (`origin_url`), else the url it fetched."""
    return str(record.get("origin_url") or record.get("url"))


def completed_shards(cache: Path) -> list[Path]:
    """Status parquets of every completed img2dataset shard under the cache (their `_stats.json` exists)."""
    out = []
    for stats in sorted(cache.glob("attempt_*/out/*_stats.json")):
        status = stats.with_name(stats.name[: -len("_stats.json")] + ".parquet")
        if status.exists() and status.with_suffix(".tar").exists():
            out.append(status)
    return out


def download_urls(urls: list[str], cache: Path, spec: DownloadSpec, shard_size: int = 10000, processes: int = 1,
                  thread_count: int = 16, retry_failed: bool = False, resolve: dict[str, str] | None = None) -> dict[str, object]:
    """Download into `cache` the urls that no completed shard there holds; returns counts.

    `urls` are cache identities; `resolve` maps an identity to the url actually requested (a served file's
    address), default the identity itself. `retry_failed`: ask again for urls that failed before (the pool's
    download retries; fetch, whose candidates are over-fetched, does not wait on dead links twice). Jobs that
    share a cache take an exclusive lock, so the second asks only for what the first did not get.
    """
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status, _ = downloaded(cache)
        done = {u for u, (s, _) in status.items() if s == "success" or not retry_failed}
        wanted = list(dict.fromkeys(urls))
        todo = [u for u in wanted if u not in done]
        log.info("download: %d urls, %d in the cache %s, %d to request", len(wanted), len(wanted) - len(todo), cache, len(todo))
        if todo:
            folder = cache / f"attempt_{time.strftime('%Y%m%dT%H%M%S')}_{os.getpid()}"
            rows = pd.DataFrame({"key": [f"{i:09d}" for i in range(len(todo))],
                                 "url": [(resolve or {}).get(u, u) for u in todo], "origin_url": todo, "caption": [""] * len(todo)})
            run_img2dataset(rows, folder, spec, shard_size=shard_size, processes=processes, thread_count=thread_count)
    return {"urls": len(wanted), "cached": len(wanted) - len(todo), "requested": len(todo)}


def downloaded(cache: Path) -> tuple[dict[str, tuple[str, str]], dict[str, Path]]:
    """url -> (status, error) over every completed shard (a success anywhere wins), and url -> the tar holding it."""
    status: dict[str, tuple[str, str]] = {}
    where: dict[str, Path] = {}
    for st_file in completed_shards(cache):
        st = pd.read_parquet(st_file)
        col = "origin_url" if "origin_url" in st.columns else "url"
        for url, s, err in zip(st[col].astype(str), st["status"], st["error_message"], strict=True):
            if status.get(url, ("",))[0] != "success":
                status[url] = (s, err or "")
                if s == "success":
                    where[url] = st_file.with_suffix(".tar")
    return status, where


def download_part(
    urls: Path,
    out_tar: Path,
    out_status: Path,
    out_stats: Path,
    cache: Path,
    spec: DownloadSpec,
    serve: Path | None = None,
    processes: int = 1,
    thread_count: int = 16,
    shard_size: int = 10000,
) -> dict[str, object]:
    """Download one pool part resumably and assemble its shard, status table and stats.

    `urls` is a parquet with columns key, url, caption. With `serve`, urls are paths relative to
    that folder, which is served on 127.0.0.1 while the download runs. Downloads are cached under
    `cache/<hash of the download settings>/` by url (a served file: by path and content), so a
    rerun asks only for urls that failed or were never tried, and a changed url list or setting
    never picks up another image.
    """
    started = time.time()
    rows = pd.read_parquet(urls)
    missing = {"key", "url", "caption"} - set(rows.columns)
    if missing:
        raise ValueError(f"{urls}: missing columns {sorted(missing)} (need key, url, caption)")
    rows["key"] = rows["key"].astype(str)
    rows["url"] = rows["url"].astype(str)
    folder = cache / cache_key(spec)
    others = [p.name for p in cache.glob("*") if p.is_dir() and p != folder] if cache.is_dir() else []
    if others:  # say why earlier downloads are not reused
        log.info("download: %d cache folder(s) of other download settings not used (%s); this one: %s",
                 len(others), ", ".join(sorted(others)[:3]), folder.name)
    with contextlib.ExitStack() as stack:
        resolve = None
        if serve is not None:
            base = stack.enter_context(serve_directory(serve))
            served = [u for u in rows["url"] if "://" not in u]
            ident = {u: served_identity(serve, u) for u in served}
            rows["url"] = [ident.get(u, u) for u in rows["url"]]
            resolve = {ident[u]: f"{base}/{u.lstrip('/')}" for u in served}
        dl = download_urls(list(rows["url"]), folder, spec, shard_size, processes, thread_count, retry_failed=True, resolve=resolve)
    return assemble_part(rows, folder, out_tar, out_status, out_stats, spec, started, dl)


def assemble_part(rows: pd.DataFrame, cache: Path, out_tar: Path, out_status: Path, out_stats: Path,
                  spec: DownloadSpec, started: float, dl: dict[str, object]) -> dict[str, object]:
    """The part's shard from the cache: each row gets its url's image (a success anywhere wins) or its last failure."""
    status, where = downloaded(cache)
    wanted = set(rows["url"])
    images: dict[str, Sample] = {}
    for tar in sorted({where[u] for u in wanted if u in where}):
        for sample in iter_shard(tar):
            url = sample_url(sample.record)
            if url in wanted and where.get(url) == tar and url not in images:
                images[url] = sample

    def ordered() -> Iterator[Sample]:
        for key, url, caption in zip(rows["key"], rows["url"], rows["caption"], strict=True):
            if url in images:
                s = images[url]
                yield Sample(key=key, image=s.image, ext=s.ext, caption=str(caption),
                             record={"key": key, "url": url, "caption": str(caption), "sha256": s.record.get("sha256"),
                                     "width": s.record.get("width"), "height": s.record.get("height")})

    n_written = write_shard(out_tar, ordered())
    table = rows[["key", "url", "caption"]].copy()
    got = table["url"].isin(images.keys())
    table["status"] = [("success" if g else status.get(u, ("not_attempted", ""))[0]) for u, g in zip(table["url"], got, strict=True)]
    table["error_message"] = [("" if g else status.get(u, ("", "never attempted"))[1]) for u, g in zip(table["url"], got, strict=True)]
    table["reason"] = [("" if s == "success" else failure_reason(e)) for s, e in zip(table["status"], table["error_message"], strict=True)]
    write_parquet(out_status, table)
    reasons = Counter(r for r in table["reason"] if r)
    stats: dict[str, object] = {
        "count": len(table), "successes": n_written, "failed": int(len(table) - n_written),
        "failures_by_reason": dict(sorted(reasons.items())), "cache": cache.name, **dl,
    }
    for reason, count in sorted(reasons.items()):
        log.warning("download: %s: %d url(s) failed: %s", out_tar.name, count, reason)
    write_json(out_stats, stats)
    write_meta(out_tar, "download", spec_dict(spec), started, stats=stats)
    log.info("download: %s: %d/%d samples in %.1fs", out_tar, n_written, len(table), time.time() - started)
    return stats


def split_parts(pool: Path, outs: list[Path], batch_rows: int = 1 << 20) -> list[int]:
    """Split a url/caption table into `len(outs)` contiguous parts (one img2dataset job each), streaming.

    Accepts the toy world's `pool.parquet` (key, file, caption: `file` becomes a url relative to
    the served folder) or a real url list (url, caption, optional key; a missing key is the row
    number). Hidden columns such as the toy world's true labels are not passed on. The table is
    read in batches of `batch_rows` and each part written as it goes, so a LAION-size url list
    (hundreds of millions of rows) never sits in memory.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = pq.ParquetFile(pool)
    names = f.schema_arrow.names
    url_col = "url" if "url" in names else "file" if "file" in names else None
    missing = {"url", "caption"} - set(names) - ({"url"} if url_col else set())
    if missing:
        raise ValueError(f"{pool}: missing columns {sorted(missing)} (need url and caption)")
    total = f.metadata.num_rows
    bounds = [round(i * total / len(outs)) for i in range(len(outs) + 1)]
    columns = [url_col, "caption"] + (["key"] if "key" in names else [])
    schema = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string())])
    writers: dict[int, pq.ParquetWriter] = {}

    def writer(part: int, stack: contextlib.ExitStack) -> pq.ParquetWriter:
        # each part is written under a temporary name and renamed when the stack closes without an error
        if part not in writers:
            writers[part] = stack.enter_context(pq.ParquetWriter(stack.enter_context(atomic_path(outs[part])), schema))
        return writers[part]

    with contextlib.ExitStack() as stack:
        start = 0
        for batch in f.iter_batches(batch_size=batch_rows, columns=columns):
            t = batch.to_pandas()
            keys = t["key"].astype(str) if "key" in t else pd.Series([f"{i:09d}" for i in range(start, start + len(t))])
            frame = pd.DataFrame({"key": keys.to_numpy(), "url": t[url_col].astype(str).to_numpy(),
                                  "caption": t["caption"].astype(str).to_numpy()})
            for part in range(len(outs)):
                lo, hi = max(bounds[part], start) - start, min(bounds[part + 1], start + len(t)) - start
                if lo < hi:
                    writer(part, stack).write_table(pa.Table.from_pandas(frame.iloc[lo:hi], schema=schema, preserve_index=False))
            start += len(t)
        for part in range(len(outs)):  # parts with no rows (more parts than rows) are still written
            writer(part, stack)
    return [hi - lo for lo, hi in itertools.pairwise(bounds)]
