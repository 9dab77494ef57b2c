"""Memory that does not grow with the data, measured from outside the job: collect streams a 20k-image generated set by
pointer; training reads its augmentation set memory-mapped."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, subprocess_env
from PIL import Image

from augbench.shards import Sample, pointed_images, with_pointers, write_shard


def _polled_anon_peak_mb(cmd: list[str]) -> tuple[float, float]:
    """(peak anonymous resident memory, kernel's peak RSS) of one command, read from outside it: the test polls the
    job's /proc/<pid>/status every 10 ms (RssAnon: memory the job itself holds) and reads VmHWM at the last poll.

    The kernel's peak RSS also counts file pages mapped into the job, and a memory-mapped set read at random rows
    maps up to 64 KB around each touched page (fault-around) from the page cache: reclaimable, shared, not the job's.
    """
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    anon = hwm = 0.0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            anon = max(anon, int(fields["RssAnon"].split()[0]) / 1024)
            hwm = max(hwm, int(fields["VmHWM"].split()[0]) / 1024)
        except (FileNotFoundError, KeyError, ProcessLookupError, ValueError):
            pass  # between exit and reaping
        time.sleep(0.01)
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return anon, hwm


SIDE = 112  # noise PNG of 112 px: 20,000 images hold about 720 MB, so the bound (a tenth) clears the ~20 MB by which a
# job's polled peak varies between runs of the same work (allocator transients of a 256-image batch)


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
                Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(buf, "PNG")
                samples.append(Sample(f"{key}_{j:06d}", buf.getvalue(), "png", "", {}))
                rows.append({"key": f"{key}_{j:06d}", "class": key, "label": label, "rank": j, "index": j})
            tar = out / "chunks" / f"{c // chunk:05d}.tar"
            write_shard(tar, samples)
            parts.append(with_pointers(pd.DataFrame(rows), tar, out))
        pd.concat(parts, ignore_index=True).to_parquet(out / "manifest.parquet")
        manifests.append(out / "manifest.parquet")
    return manifests


def _collect(root: Path, n_classes: int, per_class: int = 250) -> tuple[float, Path, list[Path]]:
    classes = [f"c{i}" for i in range(n_classes)]
    (root / "classes.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps({"classes": classes, "names": {k: k for k in classes}}))
    manifests = _generated_set(root / "block", classes, per_class=per_class)
    out = root / "augment"
    cmd = [sys.executable, "-m", "augbench", "collect", "--manifests", *map(str, manifests), "--classes",
           str(root / "classes.json"), "--clip", str(REPO / "models/toy/clip"), "--out-manifest",
           str(out / "manifest.parquet"), "--out-fidelity", str(out / "fidelity.json"), "--device", "cpu"]
    return _polled_anon_peak_mb(cmd)[0], out, manifests


def test_collect_streams_20k_generated_images_in_flat_memory(tmp_path: Path) -> None:
    # the unit of work is a class (its manifest, 250 images, one chunk): 10 classes, then 80, so that any state kept
    # per image or per class shows as growth, and full chunks and batches give both the same transient peak
    small, _, _ = _collect(tmp_path / "small", n_classes=10)
    peak, out, manifests = _collect(tmp_path / "large", n_classes=80)
    data = sum(f.stat().st_size for f in (tmp_path / "large/block").rglob("*.tar")) / 2**20
    print(f"\ncollect's anonymous memory, polled: 2,500 images {small:.0f} MB, 20,000 images {peak:.0f} MB ({data:.0f} MB of PNG)")
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert fidelity["images"] == 20_000 and 0 <= fidelity["generation_fidelity"] <= 1
    # 8x the images may add no image and no per-image state: at most a tenth of the data
    assert peak - small < data / 10, f"collect grew by {peak - small:.1f} MB from 2,500 to 20,000 images ({data:.0f} MB)"
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


SIZES = (10_000, 130_000)  # augmentation images of the two runs (32 px, memory-mapped)


@pytest.mark.parametrize("mixing", [{}, {"aug_share": 0.5, "aug_loss_weight": 0.5}], ids=["union", "mixed"])
def test_training_memory_does_not_grow_with_the_augmentation_set(tmp_path: Path, mixing: dict) -> None:
    classes = [f"c{i}" for i in range(10)]
    (tmp_path / "classes.json").write_text(json.dumps({"classes": classes, "names": {k: k for k in classes}}))
    real = _decoded(tmp_path / "real", 100, 10, False, 0)
    test = _decoded(tmp_path / "test", 200, 10, False, 1)
    spec = json.dumps({"arch": "resnet10", "input_size": 32, "augment": "shift_flip", "epochs": 0, "min_steps": 30,
                       "batch_size": 32, "checkpoint_every": 0, **mixing})
    anon, hwm = {}, {}
    for n in SIZES:
        aug = _decoded(tmp_path / f"aug{n}", n, 10, True, 2)
        out = tmp_path / f"run{n}"
        cmd = [sys.executable, "-m", "augbench", "train", "--real", str(real), "--root", ".", "--test", str(test),
               "--classes", str(tmp_path / "classes.json"), "--aug-manifest", str(aug), "--n-aug", str(n // 10),
               "--out-metrics", str(out / "metrics.json"), "--out-ckpt", str(out / "model.pt"), "--spec", spec]
        anon[n], hwm[n] = _polled_anon_peak_mb(cmd)  # measured from outside the job, not the job's own report
        assert json.loads((out / "metrics.json").read_text())["n_aug_images"] == n
    small, large = SIZES
    grown = anon[large] - anon[small]
    data = (large - small) * 32 * 32 * 3 / 2**20
    print(f"\ntraining job's anonymous memory, polled: {small:,} augmentation images {anon[small]:.0f} MB, {large:,} "
          f"{anon[large]:.0f} MB (kernel's peak RSS with mapped page cache: {hwm[small]:.0f} / {hwm[large]:.0f} MB)")
    # the 120k more images are 352 MB decoded: a job that loaded its set would hold that; the bound is a tenth of it,
    # which clears the ~10 MB by which the polled peak of the same work varies between runs
    assert grown < data / 10, f"the training job's own memory grew by {grown:.0f} MB with {large - small:,} more images " \
                              f"({data:.0f} MB decoded)"


def test_image_stats_holds_one_class_at_a_time(tmp_path: Path) -> None:
    """The image_stats job over 10 then 80 classes of 200 decoded 112 px images (the unit of work is a class): its
    polled memory may grow by at most a tenth of the 70 more classes' decoded images."""
    peaks = {}
    for n_classes in (10, 80):
        folder = tmp_path / f"aug{n_classes}"
        folder.mkdir()
        n = 200 * n_classes
        images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 112, 112, 3))
        rng = np.random.default_rng(n_classes)
        for i in range(0, n, 2000):
            images[i:i + 2000] = rng.integers(0, 256, (min(2000, n - i), 112, 112, 3), dtype=np.uint8)
        images.flush()
        np.save(folder / "labels.npy", np.arange(n) % n_classes)
        np.save(folder / "ranks.npy", np.arange(n) // n_classes)
        (folder / "stats.json").write_text(json.dumps({"skipped": 0}))
        real = _decoded(tmp_path / f"real{n_classes}", 10 * n_classes, n_classes, False, 0)
        cmd = [sys.executable, "-m", "augbench", "image-stats", "--images", str(folder), "--real", str(real),
               "--clip", str(REPO / "models/toy/clip"), "--out", str(tmp_path / f"stats{n_classes}.json"), "--device", "cpu"]
        peaks[n_classes] = _polled_anon_peak_mb(cmd)[0]
        assert json.loads((tmp_path / f"stats{n_classes}.json").read_text())["classes"] == n_classes
    data = 70 * 200 * 112 * 112 * 3 / 2**20
    print(f"\nimage_stats' anonymous memory, polled: 10 classes {peaks[10]:.0f} MB, 80 classes {peaks[80]:.0f} MB "
          f"({data:.0f} MB more decoded)")
    assert peaks[80] - peaks[10] < data / 10, f"image_stats grew by {peaks[80] - peaks[10]:.0f} MB ({data:.0f} MB more)"
