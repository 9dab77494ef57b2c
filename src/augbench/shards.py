"""Reading and writing webdataset tar shards (the img2dataset output format).

A sample is the group of tar members sharing a basename: `{key}.jpg`, `{key}.txt` (caption),
`{key}.json` (img2dataset's per-sample record, with our own columns carried through).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
