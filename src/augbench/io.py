"""Atomic artifact writes and `.meta.json` sidecars.

Every artifact is written under a temporary name in the same folder and renamed into place,
so a killed job never leaves a plausible-looking partial file, and a sidecar records what
produced it (resolved spec, stage version, package versions, host, times).
"""

from __future__ import annotations

import contextlib
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
