"""Exact and near duplicates of test images planted in the pool never reach the retrieved set."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
from PIL import Image, ImageEnhance

from augbench.embed import embed_shard, embed_split
from augbench.pool import PoolPart
from augbench.retrieve import make_queries, merge
from augbench.search import search_block
from augbench.shards import Sample, write_shard
from augbench.specs import ClipSpec, EmbedSpec, RetrieveSpec, rng
from augbench.toy.clip_train import pretrain_clip
from augbench.toy.world import KINDS, render


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _setup(tmp_path: Path) -> dict[str, Path]:
    classes = [k.key for k in KINDS[:2]]
    root = tmp_path / "world"
    tables: dict[str, list[dict]] = {"train": [], "test": []}
    test_imgs: list[Image.Image] = []
    for label, cls in enumerate(classes):
        for i in range(4):
            img, _ = render(cls, rng(7, "test", cls, i), 32, pool=False)
            rel = f"test/{cls}_{i}.png"
            (root / "test").mkdir(parents=True, exist_ok=True)
            img.save(root / rel)
            tables["test"].append({"path": rel, "label": label, "class": cls})
            test_imgs.append(img)
            # the training image is a brightened copy: its nearest pool neighbours are the planted leaks
            rel = f"train/{cls}_{i}.png"
            (root / "train").mkdir(parents=True, exist_ok=True)
            ImageEnhance.Brightness(img).enhance(1.08).save(root / rel)
            tables["train"].append({"path": rel, "label": label, "class": cls})
    for split, rows in tables.items():
        pd.DataFrame(rows).to_parquet(root / f"{split}.parquet")
    samples = []
    for i in range(120):
        r = rng(7, "pool", i)
        kind = KINDS[r.randrange(6)].key
        img, colour = render(kind, r, 32, pool=True)
        samples.append(Sample(f"p{i:04d}", _png(img), "png", f"a {colour} {kind}", {"url": f"http://x/p{i}"}))
    for j, img in enumerate(test_imgs):
        samples.append(Sample(f"exact{j}", _png(img), "png", "copy", {"url": f"http://x/e{j}"}))
        samples.append(Sample(f"near{j}", _jpeg(img, 70), "jpg", "re-encoded copy", {"url": f"http://x/n{j}"}))
    write_shard(tmp_path / "pool.tar", samples)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": classes, "names": {c: c for c in classes}}))
    return {"root": root}


def _run(tmp_path: Path, spec: RetrieveSpec, tag: str) -> tuple[pd.DataFrame, dict]:
    model = tmp_path / "clip"
    part = PoolPart("0", tmp_path / "emb/img_emb/img_emb_0.npy", tmp_path / "emb/metadata/metadata_0.parquet")
    if not model.exists():
        pretrain_clip([tmp_path / "pool.tar"], model, ClipSpec(steps=2, batch_size=16, warmup_steps=1, vocab_size=600))
        embed_shard(tmp_path / "pool.tar", model, part.emb, part.meta, EmbedSpec())
        for split in ("train", "test"):
            embed_split(tmp_path / f"world/{split}.parquet", tmp_path / "world", model,
                        tmp_path / f"emb/{split}.npy", tmp_path / f"emb/{split}.parquet", EmbedSpec())
        make_queries("image", tmp_path / "classes.json", tmp_path / "q/image/queries.npy", tmp_path / "q/image/queries.parquet",
                     train=(tmp_path / "emb/train.npy", tmp_path / "emb/train.parquet"))
    search_block([part], 0, {"image": (tmp_path / "q/image/queries.npy", tmp_path / "q/image/queries.parquet")},
                 tmp_path / f"{tag}.npz", {"n_aug": spec.n_aug, "overfetch": 1, "margin": 3, "tile_rows": 50})
    stats = merge([tmp_path / f"{tag}.npz"], tmp_path / "q/image/queries.parquet", [part], tmp_path / "classes.json",
                  [(tmp_path / "emb/test.npy", tmp_path / "emb/test.parquet")], tmp_path / f"{tag}.parquet", tmp_path / f"{tag}.json",
                  spec, pool_shards=[tmp_path / "pool.tar"], eval_root=tmp_path / "world", chunk_rows=40)
    return pd.read_parquet(tmp_path / f"{tag}.parquet"), stats


def test_planted_duplicates_are_removed_and_counted(tmp_path: Path) -> None:
    _setup(tmp_path)
    planted = {f"exact{j}" for j in range(8)} | {f"near{j}" for j in range(8)}
    # control: with the filter off, the planted copies are among the nearest neighbours
    off = RetrieveSpec(mode="image", n_aug=30, leak_threshold=1.01, leak_hash_distance=-1, dedup_threshold=1.01)
    unfiltered, _ = _run(tmp_path, off, "off")
    assert planted & set(unfiltered["key"]), "test setup: planted duplicates should be retrieved without the filter"
    on = RetrieveSpec(mode="image", n_aug=30)
    filtered, stats = _run(tmp_path, on, "on")
    assert not planted & set(filtered["key"])
    assert stats["leaked_removed"] >= len(planted & set(unfiltered["key"]))
    assert sum(v["leaked_removed"] for v in stats["per_class"].values()) == stats["leaked_removed"]
    assert len(filtered) > 0
    # only copies are removed: every removal is a planted image (the rest of the pool is rendered independently)
    assert stats["leaked_removed"] <= len(planted)
