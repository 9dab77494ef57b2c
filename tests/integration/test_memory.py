"""Memory that does not grow with the data: collect streams a 20k-image generated set by pointer."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import REPO, subprocess_env
from PIL import Image

from augbench.shards import Sample, pointed_images, with_pointers, write_shard

PEAK = """import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"""


def _peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident set of one command (its own process: the wrapper's only child), in MB."""
    res = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True, env=subprocess_env(), timeout=900)
    rc, kb = res.stdout.split()[-2:]
    assert rc == "0", res.stderr[-3000:]
    return int(kb) / 1024


def _generated_set(root: Path, classes: list[str], per_class: int, chunk: int = 250) -> list[Path]:
    """Per-class folders as a generate block writes them: chunks/<c>.tar and a manifest with pointers."""
    rng = np.random.default_rng(0)
    manifests = []
    for label, key in enumerate(classes):
        out = root / key
        parts = []
        for c in range(0, per_class, chunk):
            samples, rows = [], []
            for j in range(c, min(c + chunk, per_class)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
                samples.append(Sample(f"{key}_{j:06d}", buf.getvalue(), "png", "", {}))
                rows.append({"key": f"{key}_{j:06d}", "class": key, "label": label, "rank": j, "index": j})
            tar = out / "chunks" / f"{c // chunk:05d}.tar"
            write_shard(tar, samples)
            parts.append(with_pointers(pd.DataFrame(rows), tar, out))
        pd.concat(parts, ignore_index=True).to_parquet(out / "manifest.parquet")
        manifests.append(out / "manifest.parquet")
    return manifests


def _collect(root: Path, per_class: int) -> tuple[float, Path, list[Path]]:
    classes = [f"c{i}" for i in range(10)]
    (root / "classes.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps({"classes": classes, "names": {k: k for k in classes}}))
    manifests = _generated_set(root / "block", classes, per_class=per_class)
    out = root / "augment"
    cmd = [sys.executable, "-m", "augbench", "collect", "--manifests", *map(str, manifests), "--classes",
           str(root / "classes.json"), "--clip", str(REPO / "models/toy/clip"), "--out-manifest",
           str(out / "manifest.parquet"), "--out-fidelity", str(out / "fidelity.json"), "--device", "cpu"]
    return _peak_rss_mb(cmd), out, manifests


def test_collect_streams_20k_generated_images_in_flat_memory(tmp_path: Path) -> None:
    small, _, _ = _collect(tmp_path / "small", per_class=20)
    peak, out, manifests = _collect(tmp_path / "large", per_class=2000)
    print(f"\ncollect peak RSS: 200 images {small:.0f} MB, 20,000 images {peak:.0f} MB")
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert fidelity["images"] == 20_000 and 0 <= fidelity["generation_fidelity"] <= 1
    # the floor is the libraries, and it moves: the CUDA build's shared libraries count in RSS as far as they are
    # mapped, which depends on the page cache (import torch alone: 507 MB in a long-used venv, 705 MB in CI's fresh
    # one; with transformers' CLIP 750 / 981 MB), so the test bounds the growth, not the level. 100x the images
    # (61 MB of PNG) may add only the manifest and one batch.
    assert peak - small < 100, f"collect grew by {peak - small:.0f} MB from 200 to 20,000 images"
    assert not list(out.glob("*.tar")), "the augmentation set is pointers, not a second copy"
    # the set's pointers (rebased to its own folder) read back the very bytes the chunks hold
    joined = pointed_images(out / "manifest.parquet")
    first = pointed_images(manifests[3])
    assert len(joined) == 20_000 and all(joined[k] == v for k, v in first.items())


def _decoded(folder: Path, n: int, n_classes: int, ranks: bool, seed: int) -> Path:
    """A decoded folder as `augbench decode` writes it, of random 32 px images."""
    folder.mkdir(parents=True)
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    rng = np.random.default_rng(seed)
    for i in range(0, n, 5000):
        images[i:i + 5000] = rng.integers(0, 256, (min(5000, n - i), 32, 32, 3), dtype=np.uint8)
    images.flush()
    labels = np.arange(n) % n_classes
    np.save(folder / "labels.npy", labels)
    np.save(folder / "ranks.npy", np.arange(n) // n_classes if ranks else np.full(n, -1))
    (folder / "stats.json").write_text(json.dumps({"images": n, "decoded": n, "skipped": 0, "skipped_by_reason": {}}))
    return folder


def test_training_memory_does_not_grow_with_the_augmentation_set(tmp_path: Path) -> None:
    classes = [f"c{i}" for i in range(10)]
    (tmp_path / "classes.json").write_text(json.dumps({"classes": classes, "names": {k: k for k in classes}}))
    real = _decoded(tmp_path / "real", 100, 10, False, 0)
    test = _decoded(tmp_path / "test", 200, 10, False, 1)
    spec = json.dumps({"arch": "resnet10", "input_size": 32, "augment": "shift_flip", "epochs": 0, "min_steps": 30,
                       "batch_size": 32, "checkpoint_every": 0})
    anon = {}
    for n in (10_000, 40_000):
        aug = _decoded(tmp_path / f"aug{n}", n, 10, True, 2)
        out = tmp_path / f"run{n}"
        cmd = [sys.executable, "-m", "augbench", "train", "--real", str(real), "--root", ".", "--test", str(test),
               "--classes", str(tmp_path / "classes.json"), "--aug-manifest", str(aug), "--n-aug", str(n // 10),
               "--out-metrics", str(out / "metrics.json"), "--out-ckpt", str(out / "model.pt"), "--spec", spec]
        res = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["n_aug_images"] == n
        anon[n] = metrics["memory_mb"]["anon_peak"]
    print(f"\ntraining run's own (anonymous) memory: 10k augmentation images {anon[10_000]:.0f} MB, 40k {anon[40_000]:.0f} MB")
    # the 30k more images are 92 MB decoded: held in the run's own memory they would be in this figure
    assert anon[40_000] < 1.1 * anon[10_000]
