"""Atomic artifact writes and `.meta.json` sidecars.

Every artifact is written under a temporary name in the same folder and renamed into place,
so a killed job never leaves a plausible-looking partial file, and a sidecar records what
produced it (resolved spec, stage version, package versions, host, times).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)
_PACKAGES = ("torch", "torchvision", "transformers", "diffusers", "faiss-cpu", "img2dataset", "numpy")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the final suffix (libraries such as numpy, PIL and faiss pick the
    format from it) and lives in the same folder so the rename is atomic on POSIX.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    sfx = final.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{sfx}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are shared on a cluster, so honour the umask
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; move it onto `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically, with sorted keys so identical content gives identical bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | os.PathLike[str], frame: Any) -> None:
    """Write a pandas DataFrame to parquet atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


@contextlib.contextmanager
def parquet_appender(path: str | os.PathLike[str]) -> Iterator[Any]:
    """A function that appends a DataFrame to the parquet file `path`, written atomically when the block ends: a set
    is written one part (a class) at a time and never held whole. The first non-empty part's schema is the file's,
    later parts are cast to it; with no row at all, the file has the columns of the parts given."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp, contextlib.ExitStack() as stack:
        state: dict[str, Any] = {"writer": None, "schema": None, "empty": None}

        def append(frame: pd.DataFrame) -> None:
            if frame.empty:
                state["empty"] = frame.iloc[:0]
                return
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if state["writer"] is None:
                state["schema"] = table.schema.remove_metadata()
                state["writer"] = stack.enter_context(pq.ParquetWriter(tmp, state["schema"]))
            state["writer"].write_table(table.cast(state["schema"]))

        yield append
        if state["writer"] is None:  # no row: the columns of the (empty) parts
            (state["empty"] if state["empty"] is not None else pd.DataFrame()).to_parquet(tmp, index=False)


def save_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """`torch.save` atomically, with bytes that depend only on `obj`.

    Given a path, torch names the records inside its zip after the file, here the random temporary name, so two runs
    of the same job wrote different bytes for the same weights; given an open file it names them `archive/`.
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def package_versions() -> dict[str, str]:
    """Versions of the packages that change results, for the sidecar."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_meta(artifact: str | os.PathLike[str], stage: str, spec: Any, started: float, **extra: Any) -> None:
    """Write `<artifact>.meta.json` describing how the artifact was produced."""
    data = {
        "stage": stage,
        "spec": spec,
        "packages": package_versions(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
        "elapsed_s": round(time.time() - started, 3),
        **extra,
    }
    write_json(f"{os.fspath(artifact)}.meta.json", data)


# Files up to this size are identified by their bytes; larger ones (a 4 GB checkpoint, a 200 GB tar) by size and
# modification time, which every atomic rewrite changes, so identifying them costs no read.
_HASH_LIMIT = 64 << 20


def content_id(path: str | os.PathLike[str]) -> str:
    """A short identity of a file or folder's content, for cache keys: equal ids, equal content.

    Files of at most 64 MB are hashed; larger ones contribute (size, mtime_ns). A folder is the
    hash of its files' relative paths and ids (hidden files and `.meta.json` sidecars excluded:
    they record times, not content). A hub snapshot is named by the commit in its marker file.
    """
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        marker = p / ".augbench_snapshot.json"
        if marker.exists():  # a hub snapshot (augbench.hub): the commit its revision resolved to names its content
            info = json.loads(marker.read_text())
            return hashlib.sha256(f"{info['repo_id']}@{info['commit']}".encode()).hexdigest()[:16]
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            rel = f.relative_to(p).as_posix()
            if any(part.startswith(".") for part in f.relative_to(p).parts) or rel.endswith(".meta.json"):
                continue
            h.update(f"{rel}\0{_file_id(f)}\n".encode())
        return h.hexdigest()[:16]
    return _file_id(p)


def _file_id(p: Path) -> str:
    st = p.stat()  # a missing file raises, naming it
    if st.st_size > _HASH_LIMIT:
        return f"size{st.st_size}-mtime{st.st_mtime_ns}"
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
