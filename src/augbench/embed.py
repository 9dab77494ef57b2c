"""CLIP embeddings of pool shards and target splits, in the clip-retrieval layout.

Per shard: `img_emb/{shard}.npy` (float16, L2-normalised rows) and `metadata/{shard}.parquet`
(one row per embedded image: key, url, caption, and `dhash`, a 64-bit difference hash used by
the leak filter). The model is loaded with `from_pretrained` from a folder or hub id, whether it
is the toy world's CLIP or `openai/clip-vit-large-patch14`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from augbench.device import pick_device
from augbench.imaging import UndecodableImage, open_rgb
from augbench.io import atomic_path, write_meta, write_parquet
from augbench.shards import iter_shard
from augbench.specs import EmbedSpec, spec_dict

log = logging.getLogger(__name__)


def text_positions(model: torch.nn.Module) -> int:
    """How many tokens the text tower takes: its position table's length (the toy CLIP's is 16, CLIP's 77).

    Read from the weights, not the config, whose text part is a dict in the toy model and an object in CLIP's;
    a longer prompt is truncated to this instead of indexing past the table.
    """
    emb = getattr(getattr(getattr(model, "text_model", None), "embeddings", None), "position_embedding", None)
    if emb is not None:
        return int(emb.num_embeddings)
    cfg = getattr(model.config, "text_config", None)
    value = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else getattr(cfg, "max_position_embeddings", None)
    if value is None:
        raise ValueError(f"{type(model).__name__}: cannot tell the text tower's length (no position embedding, no config)")
    return int(value)


TOY_CLIP_TYPE = "augbench_toy_clip"


def is_toy_clip(source: str | Path) -> bool:
    """Whether a model folder holds the toy CLIP (its config's model_type); a hub id or a real CLIP folder does not."""
    config = Path(source) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == TOY_CLIP_TYPE
    except (OSError, ValueError):
        return False


class Clip:
    """A loaded CLIP-style model with its image processor and tokenizer (any `from_pretrained` source)."""

    def __init__(self, source: str | Path, device: torch.device | None = None, precision: str = "fp32") -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        if is_toy_clip(source):
            import augbench.toy.clip  # noqa: F401  (registers the toy model type with AutoModel; real CLIPs do not need it)

        self.device = device or pick_device()
        self.model = AutoModel.from_pretrained(str(source)).eval().to(self.device)
        if precision == "fp16" and self.device.type == "cuda":  # a CPU has no fast fp16 matmul: fp32 there
            self.model = self.model.half()
        self.dtype = next(self.model.parameters()).dtype
        self.processor = AutoImageProcessor.from_pretrained(str(source))
        # AutoTokenizer, not CLIPTokenizer: offline, the latter can return an empty tokenizer silently.
        self.tokenizer = AutoTokenizer.from_pretrained(str(source))
        if len(self.tokenizer) < 10:
            raise ValueError(f"{source}: tokenizer has only {len(self.tokenizer)} tokens; is the model folder complete?")

    @property
    def dim(self) -> int:
        """The embedding width (CLIP's projection_dim): what an empty split's array still has."""
        return int(self.model.config.projection_dim)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised float32 image embeddings."""
        pixel = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
        out = self.model.get_image_features(pixel_values=pixel)
        emb = getattr(out, "pooler_output", out).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 text embeddings."""
        max_len = text_positions(self.model)
        ids = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        emb = getattr(out, "pooler_output", out).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()

    def zero_shot(self, images: list[Image.Image], names: list[str], template: str = "a photo of a {}.",
                  batch_size: int = 256) -> np.ndarray:
        """Index of the class prompt each image is closest to (CLIP zero-shot classification)."""
        text = self.texts([template.format(n) for n in names])
        preds = [np.argmax(self.images(images[i:i + batch_size]) @ text.T, axis=1) for i in range(0, len(images), batch_size)]
        return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def dhash(image: Image.Image, size: int = 8) -> int:
    """64-bit difference hash: robust to re-encoding and small resizes, so it finds near-copies."""
    g = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int(np.packbits(bits).view(">i8")[0])


def _embed_batches(clip: Clip, items: Iterable[tuple[dict[str, Any], bytes | Image.Image]], batch_size: int,
                   source: str, columns: list[str]) -> tuple[np.ndarray, pd.DataFrame, Counter[str]]:
    """Embed (row, image) items in batches; undecodable images are skipped, logged and counted."""
    embs: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    batch: list[Image.Image] = []
    batch_rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()

    def flush() -> None:
        if batch:
            embs.append(clip.images(batch))
            rows.extend(batch_rows)
            batch.clear()
            batch_rows.clear()
            if len(embs) % 20 == 0:
                log.info("embed: %s: %d images embedded", source, len(rows))

    for row, data in items:
        name = f"{source}:{row.get('key') or row.get('path')}"
        try:
            img = data.convert("RGB") if isinstance(data, Image.Image) else open_rgb(data, name)
        except UndecodableImage as exc:
            skipped[exc.reason] += 1
            log.warning("embed: skipping undecodable image %s", exc)
            continue
        batch.append(img)
        batch_rows.append({**row, "dhash": dhash(img)})
        if len(batch) >= batch_size:
            flush()
    flush()
    if not embs:  # an empty split (val_per_class 0) or part: still the model's width, and the table's columns
        return np.zeros((0, clip.dim), np.float32), pd.DataFrame(rows, columns=[*columns, "dhash"]), skipped
    return np.concatenate(embs), pd.DataFrame(rows), skipped


def _write(emb: np.ndarray, meta: pd.DataFrame, out_emb: Path, out_meta: Path, precision: str) -> None:
    dtype = np.float16 if precision == "fp16" else np.float32
    with atomic_path(out_emb) as tmp:
        np.save(tmp, emb.astype(dtype))
    write_parquet(out_meta, meta)


def embed_shard(shard: Path, model: str | Path, out_emb: Path, out_meta: Path, spec: EmbedSpec) -> dict[str, int]:
    """Embed every image of one pool shard."""
    started = time.time()
    clip = Clip(model, precision=spec.precision)  # fp16 on a GPU, as clip-retrieval runs ViT-L/14; fp32 on a CPU
    items = (({"image_path": s.key, "key": s.key, "url": s.record.get("url"), "caption": s.caption}, s.image)
             for s in iter_shard(shard))
    emb, meta, skipped = _embed_batches(clip, items, spec.batch_size, str(shard), ["image_path", "key", "url", "caption"])
    _write(emb, meta, out_emb, out_meta, spec.precision)
    stats = {"embedded": len(meta), "skipped": sum(skipped.values()), "skipped_by_reason": dict(sorted(skipped.items()))}
    write_meta(out_emb, "embed", spec_dict(spec), started, model=str(model), stats=stats)
    log.info("embed: %s: %s in %.1fs", shard, stats, time.time() - started)
    return stats


def embed_split(split_table: Path, root: Path, model: str | Path, out_emb: Path, out_meta: Path, spec: EmbedSpec) -> dict[str, int]:
    """Embed a target split given as a table of (path relative to `root`, label, class)."""
    started = time.time()
    table = pd.read_parquet(split_table)
    clip = Clip(model, precision=spec.precision)  # fp16 on a GPU, as clip-retrieval runs ViT-L/14; fp32 on a CPU

    def items() -> Iterable[tuple[dict[str, Any], bytes]]:
        for row in table.to_dict("records"):
            path = root / row["path"]
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise FileNotFoundError(f"{split_table}: image {path} listed but not readable: {exc}") from exc
            yield row, data

    emb, meta, skipped = _embed_batches(clip, items(), spec.batch_size, str(split_table), list(table.columns))
    _write(emb, meta, out_emb, out_meta, spec.precision)
    stats = {"embedded": len(meta), "skipped": sum(skipped.values()), "skipped_by_reason": dict(sorted(skipped.items()))}
    write_meta(out_emb, "embed", spec_dict(spec), started, model=str(model), stats=stats)
    return stats
