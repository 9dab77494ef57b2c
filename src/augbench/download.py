"""Download a url/caption pool part with img2dataset, resumably, counting failures by reason.

Each part is downloaded into a cache folder that is not a Snakemake output, one completed
img2dataset run per attempt (`attempt_000`, `attempt_001`, ...). A rerun of the same part asks
img2dataset only for the rows that no earlier attempt fetched, then assembles the part's shard
from all attempts. So a follow-up run downloads only the failed URLs, and nothing fetched is lost
when Snakemake deletes the part's outputs before re-running it.

For the toy world, `serve_directory` serves the generated pool on 127.0.0.1 for the duration of
the download; the part's urls are then paths relative to that server.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import itertools
import logging
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from augbench.io import atomic_path, write_json, write_meta, write_parquet
from augbench.shards import Sample, iter_shard, write_shard
from augbench.specs import DownloadSpec, spec_dict

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


def _attempts(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("attempt_*") if p.is_dir())


def run_img2dataset(rows: pd.DataFrame, folder: Path, spec: DownloadSpec, shard_size: int | None = None,
                     processes: int | None = None) -> None:
    """One img2dataset call on `rows` (columns key, url, caption) into `folder`/out (webdataset).

    `shard_size` urls per output shard (default: one shard); `processes` img2dataset worker processes
    (default: the spec's `processes_count`). img2dataset writes a shard's `_stats.json` once the shard is
    complete, which is what a resumed fetch reads to know which urls were tried.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download as i2d_download

    folder.mkdir(parents=True, exist_ok=True)
    urls = folder / "urls.parquet"
    # img2dataset reserves the name `key` for its own sample ids: carry ours as `pool_key`.
    rows[["key", "url", "caption"]].rename(columns={"key": "pool_key"}).to_parquet(urls, index=False)
    i2d_download(
        url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
        save_additional_columns=["pool_key"], output_format="webdataset", output_folder=str(folder / "out"),
        image_size=spec.image_size, resize_mode=spec.resize_mode, encode_format=spec.encode_format,
        encode_quality=spec.encode_quality, processes_count=processes or spec.processes_count, thread_count=spec.thread_count,
        timeout=spec.timeout, retries=spec.retries, number_sample_per_shard=max(shard_size or len(rows), 1),
        # the folder is always fresh; "overwrite" would delete the _tmp folder img2dataset has just made
        enable_wandb=False, distributor="multiprocessing", incremental_mode="incremental", compute_hash="sha256",
        extract_exif=False,
    )
    if not list((folder / "out").glob("*.parquet")):
        raise RuntimeError(f"download: img2dataset wrote no status parquet in {folder / 'out'} (all workers failed?)")


def download_part(
    urls: Path,
    out_tar: Path,
    out_status: Path,
    out_stats: Path,
    cache: Path,
    spec: DownloadSpec,
    serve: Path | None = None,
) -> dict[str, object]:
    """Download one pool part resumably and assemble its shard, status table and stats.

    `urls` is a parquet with columns key, url, caption. With `serve`, urls are paths relative
    to that folder, which is served on 127.0.0.1 while the download runs.
    """
    started = time.time()
    rows = pd.read_parquet(urls)
    missing = {"key", "url", "caption"} - set(rows.columns)
    if missing:
        raise ValueError(f"{urls}: missing columns {sorted(missing)} (need key, url, caption)")
    rows["key"] = rows["key"].astype(str)
    cache.mkdir(parents=True, exist_ok=True)
    done_keys: set[str] = set()
    for attempt in _attempts(cache):
        for status in (attempt / "out").glob("*.parquet"):
            st = pd.read_parquet(status, columns=["pool_key", "status"])
            done_keys.update(st.loc[st["status"] == "success", "pool_key"].astype(str))
    todo = rows[~rows["key"].isin(done_keys)]
    log.info("download: %s: %d rows, %d already fetched by earlier attempts, %d to request",
             urls, len(rows), len(rows) - len(todo), len(todo))
    if len(todo):
        n = len(_attempts(cache))
        tmp = cache / f".attempt_{n:03d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.ExitStack() as stack:
            if serve is not None:
                base = stack.enter_context(serve_directory(serve))
                todo = todo.assign(url=[u if "://" in u else f"{base}/{u.lstrip('/')}" for u in todo["url"]])
            run_img2dataset(todo, tmp, spec)
        os.replace(tmp, cache / f"attempt_{n:03d}")
    return assemble_part(rows, cache, out_tar, out_status, out_stats, spec, started)


def assemble_part(rows: pd.DataFrame, cache: Path, out_tar: Path, out_status: Path, out_stats: Path,
                  spec: DownloadSpec, started: float) -> dict[str, object]:
    """Merge all attempts: the first success of each key wins; its last failure is its status."""
    samples: dict[str, Sample] = {}
    status: dict[str, tuple[str, str]] = {}
    attempts = _attempts(cache)
    for attempt in attempts:
        for st_file in sorted((attempt / "out").glob("*.parquet")):
            st = pd.read_parquet(st_file)
            for key, s, err in zip(st["pool_key"].astype(str), st["status"], st["error_message"], strict=True):
                if status.get(key, ("",))[0] != "success":
                    status[key] = (s, err or "")
        for tar in sorted((attempt / "out").glob("*.tar")):
            for sample in iter_shard(tar):
                key = str(sample.record.get("pool_key", sample.key))
                if key not in samples:
                    sample.record = {"key": key, "url": sample.record.get("url"), "caption": sample.caption,
                                     "sha256": sample.record.get("sha256"), "width": sample.record.get("width"),
                                     "height": sample.record.get("height")}
                    sample.key = key
                    samples[key] = sample
    ordered = [samples[k] for k in rows["key"] if k in samples]
    n_written = write_shard(out_tar, ordered)
    table = rows[["key", "url", "caption"]].copy()
    table["status"] = [("success" if k in samples else status.get(k, ("not_attempted", ""))[0]) for k in table["key"]]
    table["error_message"] = [("" if k in samples else status.get(k, ("", "never attempted"))[1]) for k in table["key"]]
    table["reason"] = [("" if s == "success" else failure_reason(e)) for s, e in zip(table["status"], table["error_message"], strict=True)]
    write_parquet(out_status, table)
    reasons = Counter(r for r in table["reason"] if r)
    stats: dict[str, object] = {
        "count": len(table), "successes": n_written, "failed": int(len(table) - n_written),
        "failures_by_reason": dict(sorted(reasons.items())), "attempts": len(attempts),
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
