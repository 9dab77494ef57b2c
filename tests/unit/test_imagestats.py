"""Diversity and KID of an augmentation set: the formulas against their definitions, and the job on decode caches
with a real-architecture CLIP folder: copies of one picture have no diversity, and a set drawn like the real images
lies nearer to them than noise does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from photos import photo

from augbench.imagestats import diversity, image_stats, kid


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_diversity_is_the_mean_pairwise_cosine_distance() -> None:
    x = _unit(np.random.default_rng(0).normal(size=(7, 5)))
    pairs = [1 - x[i] @ x[j] for i in range(7) for j in range(7) if i != j]
    assert diversity(x) == pytest.approx(np.mean(pairs))
    assert diversity(np.repeat(x[:1], 4, axis=0)) == pytest.approx(0, abs=1e-12)
    assert diversity(np.eye(4)) == pytest.approx(1) and np.isnan(diversity(x[:1]))


def test_kid_is_the_unbiased_polynomial_mmd() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 0.5

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float((a @ b / 3 + 1) ** 3)

    want = (sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
            + sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
            - 2 * sum(k(a, b) for a in x for b in y) / 30)
    assert kid(x, y) == pytest.approx(want)
    # unit vectors, as CLIP features: two draws of one distribution against a draw of a shifted one
    a, b, shifted = (_unit(rng.normal(size=(400, 3)) + mean) for mean in (0, 0, [1.5, 0, 0]))
    assert abs(kid(a, b)) < kid(a, shifted) / 10, (kid(a, b), kid(a, shifted))
    assert np.isnan(kid(x[:1], y))


def _decoded(folder: Path, images: list[np.ndarray], labels: list[int]) -> Path:
    folder.mkdir(parents=True)
    np.save(folder / "images.npy", np.stack(images).astype(np.uint8))
    np.save(folder / "labels.npy", np.array(labels))
    np.save(folder / "ranks.npy", np.arange(len(labels)))
    (folder / "stats.json").write_text(json.dumps({"skipped": 0}))
    return folder


def test_the_job_on_decode_caches_with_a_real_clip(tmp_path: Path, tiny_clip: Path) -> None:
    def shot(seed: int, cls: int) -> np.ndarray:
        return np.asarray(photo(seed, cls, (32, 32)))

    real = _decoded(tmp_path / "real", [shot(s, c) for c in (0, 1) for s in range(8)], [0] * 8 + [1] * 8)
    alike = _decoded(tmp_path / "alike", [shot(100 + s, c) for c in (0, 1) for s in range(8)], [0] * 8 + [1] * 8)
    copies = _decoded(tmp_path / "copies", [shot(100, c) for c in (0, 1) for _ in range(8)], [0] * 8 + [1] * 8)
    rng = np.random.default_rng(0)
    noise = _decoded(tmp_path / "noise", list(rng.integers(0, 256, (16, 32, 32, 3))), [0] * 8 + [1] * 8)
    got = {name: image_stats(folder, real, tiny_clip, tmp_path / f"{name}.json")
           for name, folder in (("alike", alike), ("copies", copies), ("noise", noise))}
    assert got["copies"]["diversity"] == pytest.approx(0, abs=1e-5)
    assert got["alike"]["diversity"] > 0.01
    assert got["alike"]["kid"] < got["noise"]["kid"], {k: v["kid"] for k, v in got.items()}
    assert got["alike"]["classes"] == 2 and got["alike"]["per_class"]["1"]["real_images"] == 8
    assert json.loads((tmp_path / "alike.json").read_text())["kid"] == pytest.approx(got["alike"]["kid"])
