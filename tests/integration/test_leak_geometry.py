"""Leaks caught whatever the geometry: copies of val/test photos planted in a served, precomputed-embedding pool are
removed and counted per class, whatever was done to the copy (another aspect ratio, a 90 % centre crop, a letterbox,
JPEG quality 50, a mirror) and however img2dataset stored it (letterboxed or centre-cropped); near misses (the same
class, another photo) are kept.

Nomination is not what is tested here: the pool's stored vectors come from "a CLIP that finds copies" (a copy's stored
vector is its original's), and so do the near misses' (they are nominated too, so the pixels must clear them). The
target is a real-layout ImageFolder of non-square JPEGs; the chain is the workflow's own functions: target split,
queries, a search block, the merge, fetch over 127.0.0.1 and the report's yield table.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from photos import jpeg, photo
from PIL import Image, ImageOps

from augbench.fetch import fetch
from augbench.pool import PoolPart
from augbench.report import leaked_removed, yield_table
from augbench.retrieve import make_queries, merge
from augbench.search import search_block
from augbench.specs import DownloadSpec, FetchSpec, RetrieveSpec
from augbench.target import TargetSpec, build_target

CLASSES = ["heron", "kayak", "tram"]
DIM = 16


def centre_crop(img: Image.Image, aspect: float | None = None, scale: float = 1.0) -> Image.Image:
    w, h = img.size
    bw, bh = (w, h) if aspect is None else ((h * aspect, h) if aspect < w / h else (w, w / aspect))
    bw, bh = bw * scale, bh * scale
    return img.crop((round((w - bw) / 2), round((h - bh) / 2), round((w + bw) / 2), round((h + bh) / 2)))


# what the web did to each planted copy; each is then stored by img2dataset (letterboxed or centre-cropped)
EDITS = {
    "aspect_3_4": lambda im: centre_crop(im, aspect=3 / 4).resize((90, 120)),
    "crop_90": lambda im: centre_crop(im, scale=0.9).resize(im.size),
    "letterbox": lambda im: ImageOps.pad(im, (max(im.size),) * 2, color=(0, 0, 0)),
    "jpeg_50": lambda im: Image.open(io.BytesIO(jpeg(im, 50))),
    "mirror": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
}


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Target photos, the eval images to copy, the served pool files and the precomputed embedding folder."""
    tmp = tmp_path_factory.mktemp("leak_geometry")
    seed = 0
    for split, n in (("train", 6), ("val", 3)):
        for label, cls in enumerate(CLASSES):
            (tmp / "data" / split / cls).mkdir(parents=True)
            for i in range(n):
                seed += 1
                size = (120, 90) if i % 2 == 0 else (90, 120)
                (tmp / "data" / split / cls / f"DSC_{seed:04d}.JPG").write_bytes(jpeg(photo(seed, label, size)))
    build_target(TargetSpec(root=str(tmp / "data"), train_fraction=None, train_per_class=2, val_per_class=1), tmp / "split")
    rng = np.random.default_rng(1)
    direction = _unit(rng.normal(size=(len(CLASSES), DIM)))

    def vector(label: int) -> np.ndarray:  # "CLIP": the class's direction and the image's own small offset
        return _unit(direction[label] + 0.25 * rng.normal(size=DIM))

    splits = {s: pd.read_parquet(tmp / f"split/target/{s}.parquet") for s in ("train", "val", "test")}
    for s, t in splits.items():
        np.save(tmp / f"{s}.npy", np.stack([vector(int(label)) for label in t["label"]]))
        t.to_parquet(tmp / f"{s}_meta.parquet")
    evals = pd.concat([splits["val"].assign(split="val"), splits["test"].assign(split="test")], ignore_index=True)
    eval_vec = np.concatenate([np.load(tmp / "val.npy"), np.load(tmp / "test.npy")])
    # five eval images of the three classes get a copy each (one edit per copy), and a near miss (same class, another
    # photo, nominated with the eval image's own vector)
    picks = [0, 1, 2, 3, 4]
    served = tmp / "served"
    served.mkdir()
    rows, vecs, planted = [], [], []
    for j, (edit, fn) in zip(picks, EDITS.items(), strict=True):
        original = Image.open(evals.at[j, "path"]).convert("RGB")
        label = int(evals.at[j, "label"])
        (served / f"copy_{edit}.jpg").write_bytes(jpeg(fn(original)))
        rows.append({"url": f"copy_{edit}.jpg", "caption": f"a {CLASSES[label]}"})
        vecs.append(eval_vec[j])
        planted.append((f"copy_{edit}.jpg", CLASSES[label]))
        seed += 1
        near = photo(seed, label, original.size)
        (served / f"near_{edit}.jpg").write_bytes(jpeg(near))
        rows.append({"url": f"near_{edit}.jpg", "caption": f"a {CLASSES[label]}"})
        vecs.append(eval_vec[j])
    for k in range(18):  # ordinary pool photos of the classes
        seed += 1
        label = k % len(CLASSES)
        (served / f"pool_{k}.jpg").write_bytes(jpeg(photo(seed, label, (128, 96) if k % 3 else (96, 128))))
        rows.append({"url": f"pool_{k}.jpg", "caption": f"a {CLASSES[label]}"})
        vecs.append(vector(label))
    (tmp / "pool/img_emb").mkdir(parents=True)
    (tmp / "pool/metadata").mkdir(parents=True)
    np.save(tmp / "pool/img_emb/img_emb_0.npy", np.stack(vecs).astype(np.float16))
    pd.DataFrame(rows).to_parquet(tmp / "pool/metadata/metadata_0.parquet")
    return {"tmp": tmp, "served": served, "rows": rows, "planted": planted}


@pytest.mark.parametrize("resize_mode", ["border", "center_crop"])
def test_copies_of_eval_photos_are_removed_and_counted_and_near_misses_kept(
        world: dict, recording_server: tuple[str, Path, list[str]], tmp_path: Path, resize_mode: str) -> None:
    base, served, _ = recording_server
    for f in world["served"].iterdir():
        (served / f.name).write_bytes(f.read_bytes())
    tmp = world["tmp"]
    # the pool's urls point at this test's server
    pool = tmp_path / "pool"
    (pool / "img_emb").mkdir(parents=True)
    (pool / "metadata").mkdir(parents=True)
    (pool / "img_emb/img_emb_0.npy").write_bytes((tmp / "pool/img_emb/img_emb_0.npy").read_bytes())
    meta = pd.read_parquet(tmp / "pool/metadata/metadata_0.parquet")
    meta.assign(url=[f"{base}/{u}" for u in meta["url"]]).to_parquet(pool / "metadata/metadata_0.parquet")
    part = PoolPart("0", pool / "img_emb/img_emb_0.npy", pool / "metadata/metadata_0.parquet")

    classes_file = tmp / "split/classes.json"
    make_queries("image", classes_file, tmp_path / "q.npy", tmp_path / "q.parquet", train=(tmp / "train.npy", tmp / "train_meta.parquet"))
    n_aug = 12  # more than a class's candidates: every pool item is looked at
    search_block([part], 0, {"image": (tmp_path / "q.npy", tmp_path / "q.parquet")}, tmp_path / "block.npz",
                 {"n_aug": n_aug, "overfetch": 1, "margin": 3, "tile_rows": 64})
    spec = RetrieveSpec(mode="image", n_aug=n_aug, dedup_threshold=1.01)
    merged = merge([tmp_path / "block.npz"], tmp_path / "q.parquet", [part], classes_file,
                   [(tmp / "val.npy", tmp / "val_meta.parquet"), (tmp / "test.npy", tmp / "test_meta.parquet")],
                   tmp_path / "neighbors.parquet", tmp_path / "merge.json", spec)
    neighbors = pd.read_parquet(tmp_path / "neighbors.parquet")
    assert len(neighbors) == len(world["rows"]), "every pool photo is a candidate of one class"
    suspects = neighbors[neighbors["leak_suspects"].map(len) > 0]["url"].str.rsplit("/", n=1).str[1]
    assert sorted(suspects) == sorted(r["url"] for r in world["rows"] if r["url"].startswith(("copy_", "near_"))), \
        "the merge nominates copies and near misses alike (their stored vectors are the eval images')"
    assert merged["leaked_removed"] == 0, "a remote pool's merge only nominates"

    dl = DownloadSpec(image_size=64, resize_mode=resize_mode, timeout=5, retries=0, encode_format="jpg", encode_quality=90)
    stats = fetch(tmp_path / "neighbors.parquet", tmp_path / "out.tar", tmp_path / "manifest.parquet", tmp_path / "fetch.json",
                  n_aug, FetchSpec(min_cosine=None, min_yield=0.0), CLASSES, cache=tmp_path / "cache", download_spec=dl)
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    kept = set(manifest["url"].str.rsplit("/", n=1).str[1])
    copies = {name for name, _ in world["planted"]}
    assert not kept & copies, f"copies kept with resize_mode {resize_mode}: {sorted(kept & copies)}"
    assert {r["url"] for r in world["rows"]} - copies <= kept, "every near miss and pool photo is kept"
    # counted per class, in fetch's stats and in the report (merge + fetch)
    expected = pd.Series([c for _, c in world["planted"]]).value_counts().to_dict()
    by_url_class = dict(zip(neighbors["url"].str.rsplit("/", n=1).str[1], neighbors["class"], strict=True))
    assert stats["leaked_per_class"] == pd.Series([by_url_class[n] for n in copies]).value_counts().to_dict()
    assert stats["leaked_removed"] == 5 == sum(expected.values())
    files = {"manifest": tmp_path / "manifest.parquet", "stats": tmp_path / "merge.json", "fetch_stats": tmp_path / "fetch.json"}
    assert leaked_removed(files) == 5
    y = yield_table([("retrieval_image", n_aug)], {"retrieval_image": tmp_path / "manifest.parquet"},
                    {"retrieval_image": files}, CLASSES)
    assert y["leaked_fetch"].sum() == 5 and (y["reasons"].str.contains("leaked")).sum() == y["leaked_fetch"].gt(0).sum()
