"""The content check of fetch (CLIP over every downloaded candidate) against a bare loop of `get_image_features`.

A remote pool's candidates arrive as img2dataset stored them (a webdataset tar of JPEGs). Two arms over the same bytes:
  * bare: decode each image (augbench's decoder), the model's own `CLIPImageProcessor`, `CLIPModel.get_image_features`
    in batches of `--batch`: the least any check must do;
  * fetch: `augbench.fetch.fetch` on the downloads table (the job `fetch_retrieved` runs): read the tar, decode, embed
    in batches of `--batch`, compare with the stored vectors, select, write the kept images and manifest;
and a third, fetch again with the embedding cache warm (a rerun, a larger n_aug, the other retrieval mode).
Repeats are interleaved (bare, fetch, bare, fetch, ...); the median and spread of each are printed, and the ratio
bare / fetch of the medians (1.0: the check costs what the model costs).

The model is a randomly initialised `transformers.CLIPModel` of ViT-B/32's shape by default (`--vision large` for
ViT-L/14's: about 20x the compute per image); weights do not change the cost.

    PYTHONPATH=src python benchmarks/content_check.py                      # CPU, ViT-B/32 shape, 128 images
    PYTHONPATH=src python benchmarks/content_check.py --device cuda --vision large --images 2048 --precision fp16

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

from augbench.embed import Clip  # noqa: E402
from augbench.fetch import CheckSettings, fetch  # noqa: E402
from augbench.imaging import open_rgb  # noqa: E402
from augbench.pool import PoolPart  # noqa: E402
from augbench.shards import Sample, iter_shard, write_shard  # noqa: E402
from augbench.specs import FetchSpec  # noqa: E402

VISION = {"base": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 224, "patch_size": 32},
          "large": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                    "image_size": 224, "patch_size": 14}}


def build_clip(out: Path, vision: str) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from augbench.toy.clip_train import train_tokenizer

    tok = train_tokenizer(["a photo of a thing."] * 20, 300)
    text = {"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    CLIPModel(CLIPConfig(text_config=text, vision_config=VISION[vision], projection_dim=768)).save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out)
    return out


def build_downloads(tmp: Path, n: int, dim: int) -> tuple[Path, Path, PoolPart]:
    """A tar of n JPEG photos as img2dataset stores them, its downloads table, ranked candidates and a pool part."""
    import hashlib

    from photos import jpeg, photo

    samples, rows, cands = [], [], []
    for i in range(n):
        data = jpeg(photo(i, i % 5, (320, 240) if i % 2 else (240, 320)))
        key = f"{i:09d}"
        url = f"http://example.invalid/{i}.jpg"
        samples.append(Sample(key, data, "jpg", "a photo", {"url": url}))
        rows.append({"url": url, "status": "success", "tar": str(tmp / "cache.tar"), "key": key,
                     "sha256": hashlib.sha256(data).hexdigest()})
        cands.append({"class": f"c{i % 5}", "label": i % 5, "rank": i // 5, "score": 1 - i / n, "query": "q", "part": 0,
                      "part_name": "0", "row": i, "key": key, "url": url, "caption": "a photo", "leak_suspects": []})
    write_shard(tmp / "cache.tar", samples)
    pd.DataFrame(rows).to_parquet(tmp / "downloads.parquet")
    pd.DataFrame(cands).to_parquet(tmp / "neighbors.parquet")
    (tmp / "pool/img_emb").mkdir(parents=True)
    (tmp / "pool/metadata").mkdir(parents=True)
    vec = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float16)
    np.save(tmp / "pool/img_emb/img_emb_0.npy", vec)
    pd.DataFrame({"url": [r["url"] for r in rows], "caption": "a photo"}).to_parquet(tmp / "pool/metadata/metadata_0.parquet")
    part = PoolPart("0", tmp / "pool/img_emb/img_emb_0.npy", tmp / "pool/metadata/metadata_0.parquet")
    return tmp / "downloads.parquet", tmp / "neighbors.parquet", part


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vision", choices=tuple(VISION), default="base")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("fp16", "fp32"), default="fp32")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="content_check_"))
    model = build_clip(tmp / "clip", a.vision)
    downloads, neighbors, part = build_downloads(tmp, a.images, 768)
    classes = [f"c{j}" for j in range(5)]
    device = torch.device(a.device)
    clip = Clip(model, device, a.precision)
    data = [s.image for s in iter_shard(tmp / "cache.tar")]

    def bare() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(data), a.batch):
                images = [open_rgb(d) for d in data[i:i + a.batch]]
                pixel = clip.processor(images=images, return_tensors="pt")["pixel_values"].to(device, clip.dtype)
                clip.model.get_image_features(pixel_values=pixel)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def check(cache: Path | None, tag: str) -> float:
        t = time.perf_counter()
        fetch(neighbors, tmp / f"{tag}.tar", tmp / f"{tag}.parquet", tmp / f"{tag}.json", a.images // 5, FetchSpec(min_cosine=-1.0,
              min_yield=0.0), classes, model=model, parts=[part], downloads=downloads,
              check=CheckSettings(a.device, a.precision, a.batch, cache))
        return time.perf_counter() - t

    bare()  # warm-up: first-call allocations and kernel selection in neither arm's figure
    times: dict[str, list[float]] = {"bare": [], "fetch": [], "fetch, cache warm": []}
    for r in range(a.repeats):
        times["bare"].append(bare())
        times["fetch"].append(check(None, f"cold{r}"))
        cache = tmp / f"cache{r}"
        check(cache, f"fill{r}")
        times["fetch, cache warm"].append(check(cache, f"warm{r}"))
    print(f"{a.images} JPEGs (320x240 / 240x320), CLIP vision {a.vision}, {a.device} {a.precision}, batch {a.batch}, "
          f"{torch.get_num_threads()} threads, {a.repeats} interleaved repeats")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:18s} median {med[k]:7.2f} s  ({a.images / med[k]:7.1f} images/s)  spread {min(v):.2f}-{max(v):.2f} s")
    print(f"  ratio bare / fetch (images/s of the check over the bare loop): {med['bare'] / med['fetch']:.3f}")
    print(f"  ratio bare / fetch with the cache warm: {med['bare'] / med['fetch, cache warm']:.1f}")


if __name__ == "__main__":
    main()
