"""Reading and writing webdataset tar shards (the img2dataset output format).

A sample is the group of tar members sharing a basename: `{key}.jpg`, `{key}.txt` (caption),
`{key}.json` (img2dataset's per-sample record, with our own columns carried through).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from augbench.io import atomic_path

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Sample:
    """One pool sample from a shard: its key, raw image bytes, caption and json record."""

    key: str
    image: bytes
    ext: str
    caption: str
    record: dict[str, Any]

    def pil(self) -> Image.Image:
        """Decode the image as RGB (the workflow's one decoder: UndecodableImage names the sample)."""
        from augbench.imaging import open_rgb

        return open_rgb(self.image, name=f"sample {self.key}")


def iter_shard(path: str | Path) -> Iterator[Sample]:
    """Yield the samples of one tar shard in file order; samples without an image are skipped."""
    group: dict[str, bytes] = {}
    current: str | None = None

    def flush(key: str, members: dict[str, bytes]) -> Sample | None:
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            log.warning("shard %s: sample %s has no image member, skipped", path, key)
            return None
        record = json.loads(members["json"]) if "json" in members else {}
        caption = members.get("txt", b"").decode("utf-8", errors="replace")
        return Sample(key=key, image=members[ext], ext=ext, caption=caption, record=record)

    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = Path(member.name).name
            key, _, ext = name.partition(".")
            if key != current and current is not None:
                sample = flush(current, group)
                if sample is not None:
                    yield sample
                group = {}
            current = key
            f = tar.extractfile(member)
            group[ext.lower()] = f.read() if f is not None else b""
        if current is not None:
            sample = flush(current, group)
            if sample is not None:
                yield sample


def write_shard(path: str | Path, samples: Iterable[Sample]) -> int:
    """Write samples to a tar shard atomically; returns the number written."""
    n = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for s in samples:
            members = {s.ext: s.image, "txt": s.caption.encode(), "json": json.dumps(s.record, sort_keys=True).encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


# Augmentation sets point into shards instead of copying them: each manifest row carries `shard` (a path relative
# to the manifest's own folder), `offset` and `size` of the image member's bytes. A reader seeks to the images it
# wants; nothing is scanned, and a generated image is stored once (the chunk it was made in).
POINTER_COLUMNS = ("shard", "offset", "size")


def index_shard(path: str | Path) -> pd.DataFrame:
    """The image member of each sample of a tar shard: key, ext, offset (of its data in the file) and size."""
    rows = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = Path(member.name).name.partition(".")
            if ext.lower() in IMAGE_EXTS:
                rows.append({"key": key, "ext": ext.lower(), "offset": member.offset_data, "size": member.size})
    return pd.DataFrame(rows, columns=["key", "ext", "offset", "size"])


def with_pointers(manifest: pd.DataFrame, shard: str | Path, relative_to: str | Path) -> pd.DataFrame:
    """`manifest` (one row per key) with the pointer columns into `shard`, the path written relative to `relative_to`."""
    index = index_shard(shard).drop_duplicates("key").set_index("key")
    keys = manifest["key"].astype(str)
    missing = sorted(set(keys) - set(index.index))
    if missing:
        raise ValueError(f"{shard}: no image for key(s) {missing[:5]} of the manifest")
    out = manifest.copy()
    out["shard"] = os.path.relpath(Path(shard), Path(relative_to))
    out["offset"] = index.loc[keys, "offset"].to_numpy()
    out["size"] = index.loc[keys, "size"].to_numpy()
    return out


def rebase(manifest: pd.DataFrame, old: str | Path, new: str | Path) -> pd.DataFrame:
    """Pointers written relative to folder `old`, rewritten relative to folder `new`."""
    out = manifest.copy()
    out["shard"] = [os.path.relpath(Path(old) / s, Path(new)) for s in out["shard"]]
    return out


def read_pointed(manifest: pd.DataFrame, folder: str | Path) -> Iterator[tuple[int, bytes]]:
    """(row position, image bytes) for the rows of a manifest with pointers, each shard opened once, in file order."""
    pos = np.arange(len(manifest))
    for shard, group in pd.DataFrame({"shard": manifest["shard"].to_numpy(), "offset": manifest["offset"].to_numpy(),
                                      "size": manifest["size"].to_numpy(), "pos": pos}).groupby("shard", sort=True):
        path = Path(os.path.normpath(Path(folder) / shard))  # "..": resolved by name, the folder need not exist yet
        with open(path, "rb") as f:  # a missing shard is the OSError that names it
            for row in group.sort_values("offset").itertuples(index=False):
                f.seek(int(row.offset))
                data = f.read(int(row.size))
                if len(data) != int(row.size):
                    raise ValueError(f"{path}: {int(row.size)} bytes at offset {int(row.offset)} expected, "
                                     f"{len(data)} found (shard changed after its manifest was written)")
                yield int(row.pos), data


def pointed_images(manifest: str | Path) -> dict[str, bytes]:
    """{key: image bytes} of a manifest with pointers (small sets: grids, tests)."""
    frame = pd.read_parquet(manifest)
    keys = frame["key"].astype(str).to_numpy()
    return {keys[i]: data for i, data in read_pointed(frame, Path(manifest).parent)}
