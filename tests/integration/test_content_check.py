"""The content check runs where CLIP runs, and checks an image once: its embedding is cached by the sha256 of the
downloaded bytes, so a rerun, a larger n_aug or the other retrieval mode embeds nothing already embedded. On the real
architecture: a tiny randomly initialised `transformers.CLIPModel` with a ViT tower, the toy package forbidden."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import subprocess_env
from photos import jpeg, photo

import augbench.embed as embed
from augbench.fetch import CheckSettings, fetch
from augbench.imaging import open_rgb
from augbench.pool import PoolPart
from augbench.shards import Sample, iter_shard, write_shard
from augbench.specs import FetchSpec

CLASSES = ["heron", "kayak"]
N = 12  # candidates per class


def _pool(tmp: Path, clip: Path, images: list, urls: list[str]) -> PoolPart:
    """A one-part clip-retrieval pool: the producer's embedding of each image (the CLIP processor's own resize)."""
    (tmp / "pool/img_emb").mkdir(parents=True)
    (tmp / "pool/metadata").mkdir(parents=True)
    np.save(tmp / "pool/img_emb/img_emb_0.npy", embed.Clip(clip).images(images).astype(np.float16))
    pd.DataFrame({"url": urls, "caption": "a photo"}).to_parquet(tmp / "pool/metadata/metadata_0.parquet")
    return PoolPart("0", tmp / "pool/img_emb/img_emb_0.npy", tmp / "pool/metadata/metadata_0.parquet")


def _downloads(tmp: Path, clip: Path) -> tuple[Path, Path, PoolPart, list[str]]:
    """A tar of downloaded JPEGs (one is a truncated file, one changed since the pool was embedded), the downloads table,
    ranked candidates of two classes, and a pool part holding the embedding each url had when the pool was embedded."""
    samples, rows, cands, stored_images = [], [], [], []
    for i in range(2 * N):
        label = i % 2
        img = photo(i, label, (64, 48) if i % 3 else (48, 64))
        data = jpeg(img)
        if i == 5:
            data = data[: len(data) // 3]  # truncated: does not decode
        if i == 7:  # the url now serves another picture (a placeholder, a replaced photo)
            data = jpeg(photo(999, 1, (64, 48)))
        key, url = f"{i:09d}", f"http://example.invalid/{i}.jpg"
        samples.append(Sample(key, data, "jpg", "a photo", {"url": url}))
        rows.append({"url": url, "status": "success", "tar": str(tmp / "cache.tar"), "key": key,
                     "sha256": hashlib.sha256(data).hexdigest()})
        cands.append({"class": CLASSES[label], "label": label, "rank": i // 2, "score": 1 - i / 100, "query": "q", "part": 0,
                      "part_name": "0", "row": i, "key": key, "url": url, "caption": "a photo", "leak_suspects": []})
        stored_images.append(img)
    write_shard(tmp / "cache.tar", samples)
    pd.DataFrame(rows).to_parquet(tmp / "downloads.parquet")
    pd.DataFrame(cands).to_parquet(tmp / "neighbors.parquet")
    part = _pool(tmp, clip, stored_images, [r["url"] for r in rows])
    return tmp / "downloads.parquet", tmp / "neighbors.parquet", part, [r["url"] for r in rows]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of images each CLIP image call embedded."""
    calls: list[int] = []
    original = embed.Clip.images

    def images(self, batch):  # type: ignore[no-untyped-def]
        calls.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(embed.Clip, "images", images)
    return calls


def test_each_downloaded_image_is_embedded_once_across_reruns_modes_and_n_aug(tmp_path: Path, tiny_clip: Path,
                                                                              counted: list[int]) -> None:
    downloads, neighbors, part, urls = _downloads(tmp_path, tiny_clip)
    counted.clear()
    # an untrained CLIP puts two different photos at cosine up to 0.997 (here the replaced image at 0.986) and a JPEG of
    # the embedded picture at >= 0.9997: the test's floor sits between (the default is calibrated for ViT-L/14)
    spec = FetchSpec(min_cosine=0.995, min_yield=0.0)
    check = CheckSettings("cpu", "fp16", 5, tmp_path / "check_cache")
    first = fetch(neighbors, tmp_path / "a.tar", tmp_path / "a.parquet", tmp_path / "a.json", 4, spec, CLASSES, model=tiny_clip,
                  parts=[part], downloads=downloads, check=check)
    assert sum(counted) == 2 * N - 1 and max(counted) <= 5, "every decodable image once, in batches of at most 5"
    assert first["by_reason"] == {"content_changed": 1, "ok": 2 * N - 2, "undecodable_image": 1}, first["by_reason"]
    # a rerun with a larger n_aug, and "the other mode" (its own candidate table, a subset in another order)
    counted.clear()
    again = fetch(neighbors, tmp_path / "b.tar", tmp_path / "b.parquet", tmp_path / "b.json", 10, spec, CLASSES, model=tiny_clip,
                  parts=[part], downloads=downloads, check=check)
    other = pd.read_parquet(neighbors).iloc[::-1].iloc[::2]
    other.to_parquet(tmp_path / "other.parquet")
    fetch(tmp_path / "other.parquet", tmp_path / "c.tar", tmp_path / "c.parquet", tmp_path / "c.json", 3, spec, CLASSES,
          model=tiny_clip, parts=[part], downloads=downloads, check=check)
    assert counted == [], "nothing embedded twice"
    assert again["by_reason"] == first["by_reason"]
    kept = pd.read_parquet(tmp_path / "b.parquet")
    assert urls[7] not in set(kept["url"]) and urls[5] not in set(kept["url"]) and len(kept) == 2 * 10
    # the cache holds what a fresh embedding gives (fp32 on this CPU), by the bytes' hash
    cache_files = list((tmp_path / "check_cache").rglob("part-*.parquet"))
    assert len(cache_files) == 1, "one new part per job that embedded something"
    index = pd.read_parquet(cache_files[0])
    assert len(index) == 2 * N and (index["row"] < 0).sum() == 1
    vec = np.load(cache_files[0].with_suffix(".npy"))
    sha = index.loc[index["row"] == 0, "sha256"].item()
    raw = next(s for s in iter_shard(tmp_path / "cache.tar") if hashlib.sha256(s.image).hexdigest() == sha)
    fresh = embed.Clip(tiny_clip).images([open_rgb(raw.image)])[0]
    assert float(vec[0].astype(np.float32) @ fresh) > 0.999


def test_the_fetch_job_takes_the_check_device_batch_and_cache_and_never_imports_the_toy_code(tmp_path: Path,
                                                                                              tiny_clip: Path) -> None:
    downloads, neighbors, part, _ = _downloads(tmp_path, tiny_clip)
    (tmp_path / "classes.json").write_text('{"classes": ["heron", "kayak"]}')
    cmd = [sys.executable, "-m", "augbench", "fetch", "--neighbors", str(neighbors), "--classes", str(tmp_path / "classes.json"),
           "--n-aug", "4", "--out-tar", str(tmp_path / "o.tar"), "--out-manifest", str(tmp_path / "o.parquet"),
           "--out-stats", str(tmp_path / "o.json"), "--downloads", str(downloads), "--check-cache", str(tmp_path / "cc"),
           "--model", str(tiny_clip), "--precision", "fp16", "--device", "cpu", "--batch-size", "7",
           "--pool-emb", str(part.emb), "--pool-meta", str(part.meta), "--pool-names", "0",
           "--spec", '{"min_cosine": 0.995, "min_yield": 0.0}']
    res = subprocess.run(cmd, env={**subprocess_env(), "AUGBENCH_FORBID_TOY": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "content check: 23 embedded, 0 from the cache" in res.stderr, res.stderr[-2000:]
    assert len(list((tmp_path / "cc").rglob("part-*.npy"))) == 1


@pytest.mark.parametrize("resize_mode", ["border", "center_crop"])
def test_good_images_stored_by_img2dataset_are_not_content_changed(tmp_path: Path, tiny_clip: Path, resize_mode: str,
                                                                   recording_server: tuple[str, Path, list[str]]) -> None:
    """The pool's vectors were computed on the photos themselves with the CLIP processor's own resize (clip-retrieval's
    way); img2dataset stores the downloads letterboxed at 64 px (white bars) or centre-cropped. Embedding the stored image
    as it is put a letterboxed photo at cosine ~0.90 with its own stored vector (below two different photos of a class,
    0.99, with this untrained CLIP); the check embeds what is inside the bars, and no good image is content_changed."""
    from augbench.specs import DownloadSpec

    base, served, _ = recording_server
    originals, cands = [], []
    for i in range(12):
        img = photo(200 + i, i % 2, (96, 64) if i % 2 else (64, 96))
        (served / f"{i}.jpg").write_bytes(jpeg(img, 95))
        originals.append(img)
        cands.append({"class": CLASSES[i % 2], "label": i % 2, "rank": i // 2, "score": 1 - i / 100, "query": "q", "part": 0,
                      "part_name": "0", "row": i, "key": f"k{i}", "url": f"{base}/{i}.jpg", "caption": "a photo", "leak_suspects": []})
    pd.DataFrame(cands).to_parquet(tmp_path / "neighbors.parquet")
    part = _pool(tmp_path, tiny_clip, originals, [c["url"] for c in cands])
    dl = DownloadSpec(image_size=64, resize_mode=resize_mode, timeout=5, retries=0, encode_format="jpg", encode_quality=95)
    stats = fetch(tmp_path / "neighbors.parquet", tmp_path / "o.tar", tmp_path / "o.parquet", tmp_path / "o.json", 6,
                  FetchSpec(min_cosine=0.95, min_yield=0.0), CLASSES, cache=tmp_path / "cache", download_spec=dl, model=tiny_clip,
                  parts=[part], check=CheckSettings("cpu", "fp32", 8, None))
    assert stats["by_reason"] == {"ok": 12}, stats["by_reason"]
