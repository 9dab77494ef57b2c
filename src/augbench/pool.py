"""Pool sources: a pool is a list of parts, each an embedding matrix plus its metadata rows.

Readers for the layouts users actually have:

* **clip-retrieval / LAION** (`layout: clip_retrieval`): `img_emb/img_emb_N.npy` beside
  `metadata/metadata_N.parquet`, as clip-retrieval's inference writer names them (N zero-padded to
  the number of digits of the partition count). Parts are paired by the *number* N, so
  `img_emb_7.npy` pairs with `metadata_0007.parquet`; LAION's extra metadata columns are allowed.
  The workflow's own pool embeddings are written in this naming too.
* **DataComp** (`layout: datacomp`): per-shard `{shard}.npz` (numpy's `savez`: `b32_img`,
  `l14_img`, ... members, stored uncompressed) beside `{shard}.parquet` (uid, url, text).

An embedding matrix is memory-mapped (an uncompressed `.npz` member too, at its offset in the zip)
and read in tiles with plain file reads, so a job that scans a part holds one tile in its own
memory, not the part: pages read through the page cache are not the job's resident memory.
Metadata are read by (part, row): only the row groups that hold the wanted rows.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

LAYOUTS = ("clip_retrieval", "datacomp")
# metadata column -> our name, per layout (the first present wins)
_COLUMNS = {
    "clip_retrieval": {"url": ("url",), "caption": ("caption",), "key": ("key", "image_path")},
    "datacomp": {"url": ("url",), "caption": ("text", "caption"), "key": ("uid", "key")},
}


@dataclass(frozen=True)
class PoolPart:
    """One part of a pool: an embedding file (an `.npy`, or a member of an `.npz`) and its metadata parquet."""

    name: str
    emb: Path
    meta: Path
    layout: str = "clip_retrieval"
    emb_key: str | None = None  # the .npz member (DataComp), e.g. "l14_img"

    @property
    def files(self) -> list[Path]:
        return [self.emb, self.meta]


def _number(stem: str) -> int | None:
    m = re.search(r"(\d+)$", stem)
    return int(m.group(1)) if m else None


def list_parts(root: str | Path, layout: str = "clip_retrieval", emb_key: str = "l14_img") -> list[PoolPart]:
    """The parts of a pool folder, in a stable order; raises ValueError naming the folder and the problem."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"pool layout {layout!r} unknown; known: {LAYOUTS}")
    if not root.is_dir():
        raise ValueError(f"pool folder {root} does not exist")
    if layout == "datacomp":
        parts = []
        for npz in sorted(root.rglob("*.npz")):
            meta = npz.with_suffix(".parquet")
            if not meta.exists():
                raise ValueError(f"pool {root}: {npz.name} has no metadata {meta.name} beside it")
            parts.append(PoolPart(str(npz.relative_to(root).with_suffix("")).replace("/", "_"), npz, meta, layout, emb_key))
        if not parts:
            raise ValueError(f"pool {root}: no *.npz files (DataComp layout: <shard>.npz beside <shard>.parquet)")
        return parts
    embs = sorted((root / "img_emb").glob("*.npy"))
    if not embs:
        raise ValueError(f"pool {root}: no img_emb/*.npy files "
                         "(clip-retrieval layout: img_emb/img_emb_N.npy + metadata/metadata_N.parquet)")
    metas = sorted((root / "metadata").glob("*.parquet"))
    by_number: dict[int, Path] = {}
    by_stem = {m.stem: m for m in metas}
    for m in metas:
        n = _number(m.stem)
        if n is not None:
            if n in by_number:
                raise ValueError(f"pool {root}: {by_number[n].name} and {m.name} both carry part number {n}")
            by_number[n] = m
    parts, missing, seen = [], [], set()
    for emb in embs:
        n = _number(emb.stem)
        meta = by_number.get(n) if n is not None else by_stem.get(emb.stem)
        if meta is None:
            meta = by_stem.get(emb.stem)
        if meta is None:
            missing.append(emb.name)
            continue
        if n is not None and n in seen:
            raise ValueError(f"pool {root}: two img_emb files carry part number {n}")
        seen.add(n)
        parts.append((n if n is not None else -1, emb.stem, PoolPart(str(n) if n is not None else emb.stem, emb, meta, layout)))
    if missing:
        raise ValueError(f"pool {root}: no metadata/*.parquet pairs with {missing[:5]} (paired by the number in the name)")
    return [p for _, _, p in sorted(parts, key=lambda t: (t[0], t[1]))]


@dataclass(frozen=True)
class _Matrix:
    """Where a part's embedding rows lie on disk: file, byte offset, shape, dtype (or an in-memory array)."""

    path: Path
    offset: int
    shape: tuple[int, int]
    dtype: np.dtype
    array: np.ndarray | None = None


def _npy_header(f: object) -> tuple[tuple[int, ...], bool, np.dtype]:
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


def _matrix(part: PoolPart) -> _Matrix:
    if part.layout == "datacomp":
        member = f"{part.emb_key}.npy"
        with zipfile.ZipFile(part.emb) as z:
            try:
                info = z.getinfo(member)
            except KeyError:
                raise ValueError(f"{part.emb}: no member {member!r} (has {sorted(z.namelist())}); set pool.embedding_key") from None
            if info.compress_type != zipfile.ZIP_STORED:  # savez_compressed: this part only is decompressed into memory
                with z.open(member) as f:
                    arr = np.load(f)
                return _Matrix(part.emb, 0, arr.shape, arr.dtype, arr)
        with open(part.emb, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            shape, fortran, dtype = _npy_header(f)
            offset = f.tell()
    else:
        with open(part.emb, "rb") as f:
            shape, fortran, dtype = _npy_header(f)
            offset = f.tell()
    if fortran or len(shape) != 2:
        raise ValueError(f"{part.emb}: expected a C-ordered 2-d embedding matrix, got shape {shape}")
    return _Matrix(part.emb, offset, (int(shape[0]), int(shape[1])), np.dtype(dtype))


def part_shape(part: PoolPart) -> tuple[int, int]:
    """(rows, width) of a part's embedding matrix, from its header alone."""
    return _matrix(part).shape


def meta_rows(part: PoolPart) -> int:
    """Rows of a part's metadata parquet, from its footer alone."""
    return pq.ParquetFile(part.meta).metadata.num_rows


def check_part(part: PoolPart, dim: int | None = None) -> tuple[int, int]:
    """Check that a part's embeddings and metadata pair up (and its width, if given); returns (rows, width)."""
    rows, width = part_shape(part)
    n_meta = meta_rows(part)
    if rows != n_meta:
        raise ValueError(f"pool part {part.name}: {part.emb} has {rows} embeddings but {part.meta} has {n_meta} metadata rows")
    if dim is not None and width != dim:
        raise ValueError(f"pool part {part.name}: {part.emb} holds {width}-d embeddings but the configured CLIP embeds {dim}-d; "
                         "the pool was embedded with another model")
    return rows, width


def iter_tiles(part: PoolPart, tile_rows: int, rows: tuple[int, int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 tile) over a part, read with plain file reads (one tile in memory at a time)."""
    m = _matrix(part)
    lo, hi = rows or (0, m.shape[0])
    row_bytes = m.shape[1] * m.dtype.itemsize
    with open(m.path, "rb") as f:
        for start in range(lo, hi, tile_rows):
            n = min(tile_rows, hi - start)
            if m.array is not None:
                raw = m.array[start:start + n]
            else:
                f.seek(m.offset + start * row_bytes)
                raw = np.frombuffer(f.read(n * row_bytes), dtype=m.dtype).reshape(n, m.shape[1])
            yield start, np.ascontiguousarray(raw, dtype=np.float32)


def gather(parts: list[PoolPart], part_idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Float32 embedding rows by (part index, row), read part by part in row order."""
    part_idx = np.asarray(part_idx, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return np.zeros((0, part_shape(parts[0])[1] if parts else 0), np.float32)
    out: np.ndarray | None = None
    for p in np.unique(part_idx):
        sel = np.flatnonzero(part_idx == p)
        m = _matrix(parts[p])
        if out is None:
            out = np.zeros((len(rows), m.shape[1]), np.float32)
        if m.array is not None:
            out[sel] = m.array[rows[sel]]
            continue
        mm = np.memmap(m.path, dtype=m.dtype, mode="r", offset=m.offset, shape=m.shape)
        order = np.argsort(rows[sel], kind="stable")
        out[sel[order]] = mm[rows[sel][order]]
        del mm
    assert out is not None
    return out


def read_rows(part: PoolPart, rows: np.ndarray, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """key, url, caption (and `extra` columns where present) of the given rows of a part, in the given order.

    Reads only the row groups that hold those rows. A missing `key` is `<part>_<row>`.
    """
    rows = np.asarray(rows, dtype=np.int64)
    f = pq.ParquetFile(part.meta)
    names = f.schema_arrow.names
    mapping = _COLUMNS[part.layout]
    pick = {ours: next((c for c in cands if c in names), None) for ours, cands in mapping.items()}
    for ours in ("url", "caption"):
        if pick[ours] is None:
            raise ValueError(f"{part.meta}: no {' or '.join(mapping[ours])!r} column (metadata needs url and caption)")
    columns = sorted({c for c in pick.values() if c} | {c for c in extra if c in names})
    bounds = np.cumsum([0] + [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)])
    groups = sorted(set(np.searchsorted(bounds, rows, side="right") - 1))
    frames = []
    for g in groups:
        t = f.read_row_group(int(g), columns=columns).to_pandas()
        t.index = np.arange(bounds[g], bounds[g + 1])
        frames.append(t)
    table = pd.concat(frames) if frames else pd.DataFrame(columns=columns)
    out = table.loc[rows]
    result = pd.DataFrame({"url": out[pick["url"]].to_numpy(), "caption": out[pick["caption"]].fillna("").astype(str).to_numpy()})
    result["key"] = out[pick["key"]].astype(str).to_numpy() if pick["key"] else [f"{part.name}_{r:09d}" for r in rows]
    for c in extra:
        if c in names:
            result[c] = out[c].to_numpy()
    return result
