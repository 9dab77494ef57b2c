"""How real and added images mix in training (issue 24's mixing options): a share of added images in every batch,
a loss weight and a label smoothing for added images. The defaults are the plain union, bit for bit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from augbench.classify import mixed_batch_indices, train
from augbench.specs import TrainSpec

SPEC = TrainSpec(arch="resnet10", input_size=16, augment="shift_flip", epochs=1, batch_size=8, min_steps=12,
                 checkpoint_every=0, label_smoothing=0.1)


def _decoded(folder: Path, n: int, ranks: bool, seed: int) -> Path:
    """A decoded folder as `augbench decode` writes it: three classes of random 16 px images."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    np.save(folder / "images.npy", rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))
    np.save(folder / "labels.npy", np.arange(n) % 3)
    np.save(folder / "ranks.npy", np.arange(n) // 3 if ranks else np.full(n, -1))
    (folder / "stats.json").write_text(json.dumps({"images": n, "decoded": n, "skipped": 0, "skipped_by_reason": {}}))
    return folder


def test_a_batch_holds_the_share_of_added_images_at_every_step() -> None:
    n_real, n = 12, 72  # 12 real, 60 added: the union would give ~83 % added images per batch
    seen_aug: set[int] = set()
    for step in range(40):
        idx = mixed_batch_indices(0, step, n_real, n, 8, 0.25)
        assert len(idx) == 8 and (idx >= n_real).sum() == 2 and (idx < n_real).sum() == 6
        assert torch.equal(idx, mixed_batch_indices(0, step, n_real, n, 8, 0.25)), "a pure function of (seed, step)"
        seen_aug |= set(idx[idx >= n_real].tolist())
    assert seen_aug == set(range(n_real, n)), "the added images are cycled through, each part in its own epochs"
    assert (mixed_batch_indices(0, 0, n_real, n_real, 8, 0.25) < n_real).all(), "no added images: real ones only"
    with pytest.raises(ValueError, match="aug_share"):
        TrainSpec(aug_share=1.5)


def _weights(tmp_path: Path, name: str, spec: TrainSpec) -> torch.Tensor:
    real, test = tmp_path / "real", tmp_path / "test"
    if not real.exists():
        _decoded(real, 12, False, 0), _decoded(test, 9, False, 1), _decoded(tmp_path / "aug", 60, True, 2)
    out = tmp_path / name
    train([real], Path("."), test, [tmp_path / "aug"], 20, 0, 3, out / "metrics.json", out / "model.pt", spec)
    state = torch.load(out / "model.pt", weights_only=False)["model"]
    return torch.cat([v.flatten().float() for v in state.values()])


def test_each_mixing_option_changes_training_and_the_defaults_are_the_plain_union(tmp_path: Path) -> None:
    plain = _weights(tmp_path, "plain", SPEC)
    # the per-image loss with weight 1 and the recipe's smoothing is the plain mean: the option's code path is exact
    same = _weights(tmp_path, "same", dataclasses.replace(SPEC, aug_loss_weight=1.0, aug_label_smoothing=0.1))
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-6)
    for name, change in (("share", {"aug_share": 0.25}), ("weight", {"aug_loss_weight": 0.3}),
                         ("smoothing", {"aug_label_smoothing": 0.0})):
        changed = _weights(tmp_path, name, dataclasses.replace(SPEC, **change))
        assert not torch.allclose(changed, plain, atol=1e-4), f"{name}: {change} trained the same weights"
