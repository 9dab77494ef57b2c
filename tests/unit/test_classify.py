"""Classifier construction: the toy's resnet10, the error for an unknown architecture, batch augmentation, and a
decoded folder of another size refused by name."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from augbench.classify import augment_batch, build_model
from augbench.specs import TrainSpec


def test_resnet10_is_a_torchvision_resnet_with_one_block_per_stage() -> None:
    model = build_model(TrainSpec(arch="resnet10", input_size=32), n_classes=7)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    r18 = build_model(TrainSpec(arch="resnet18", input_size=32), n_classes=7)
    assert sum(p.numel() for p in model.parameters()) < 0.5 * sum(p.numel() for p in r18.parameters())
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_architecture_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="resnet_nope"):
        build_model(TrainSpec(arch="resnet_nope"), n_classes=3)


@pytest.mark.parametrize("augment", ["rrc", "shift_flip"])
def test_batch_augmentation_is_a_function_of_seed_and_step(augment: str) -> None:
    spec = TrainSpec(input_size=24, augment=augment)
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    a, b, c = augment_batch(x, spec, 0, 5), augment_batch(x, spec, 0, 5), augment_batch(x, spec, 0, 6)
    assert a.shape == (4, 3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)


def test_colour_invariance_permutes_inverts_and_greys_per_image_and_keeps_shape() -> None:
    import torch

    from augbench.imaging import colour_invariance

    x = torch.zeros(64, 3, 4, 4)
    x[:, 0] = 0.9  # red images
    g = torch.Generator().manual_seed(0)
    out = colour_invariance(x.clone(), g)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    dominant = out.mean(dim=(2, 3))
    kinds = {tuple(round(v, 2) for v in row.tolist()) for row in dominant}
    assert len(kinds) >= 4, kinds  # several channel orders, inverted and grey variants: not one colour for the batch
    again = colour_invariance(x.clone(), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_a_folder_decoded_for_another_load_size_is_refused_naming_it(tmp_path: Path) -> None:
    from augbench.classify import _source
    from augbench.decoded import decode_split

    for i in range(3):
        Image.new("RGB", (40, 30), (80 * i, 20, 200)).save(tmp_path / f"{i}.png")
    pd.DataFrame({"path": [f"{i}.png" for i in range(3)], "label": [0, 1, 1]}).to_parquet(tmp_path / "train.parquet")
    decode_split(tmp_path / "train.parquet", tmp_path, 16, tmp_path / "decoded")
    images, rows, labels = _source(tmp_path / "decoded", tmp_path, 16, None, Counter())
    assert images.shape == (3, 16, 16, 3) and list(rows) == [0, 1, 2] and list(labels) == [0, 1, 1]
    with pytest.raises(ValueError, match=r"decoded.*16x16 px.*loads 24 px"):
        _source(tmp_path / "decoded", tmp_path, 24, None, Counter())
    assert np.asarray(images).dtype == np.uint8


def test_a_set_larger_than_its_buffer_is_read_in_shuffled_blocks() -> None:
    """Blocks of contiguous rows, shuffled within a buffer: every row once per epoch, a few blocks per batch, and the
    order a pure function of (seed, epoch); a set that fits the buffer keeps the uniform random order."""
    import torch

    from augbench.classify import batch_indices, epoch_order
    from augbench.specs import item_seed

    n, block, buffer = 10_000, 50, 1_000
    order = epoch_order(3, 0, n, block, buffer)
    assert sorted(order.tolist()) == list(range(n))
    for w in range(0, n, buffer):  # each buffer's worth of positions draws from buffer / block blocks
        assert len(set((order[w:w + buffer] // block).tolist())) <= buffer // block
    batch = batch_indices(3, 7, n, 100, block, buffer)
    assert len(set((batch // block).tolist())) <= buffer // block
    assert torch.equal(epoch_order.__wrapped__(3, 0, n, block, buffer), order)  # not the cache's doing
    assert not torch.equal(epoch_order(3, 1, n, block, buffer), order) and not torch.equal(epoch_order(4, 0, n, block, buffer), order)
    # a uniform order would spread a batch over ~100 blocks; and rows of one block are not kept in file order
    assert len(set((torch.randperm(n)[:100] // block).tolist())) > 60
    assert not torch.equal(order[:block].sort().values, order[:block])
    small = epoch_order(3, 0, 500, block, buffer)  # fits its buffer: exactly the plain permutation of before
    assert torch.equal(small, torch.randperm(500, generator=torch.Generator().manual_seed(item_seed(3, "train", "perm", 0))))


def test_evaluation_reads_a_memory_mapped_set_256_images_at_a_time(tmp_path: Path) -> None:
    """The judge and the test split are scored in batches of 256 read from the memory map (a 512k-image set is
    never in memory at once), and the scores are those of the whole set."""
    from augbench.classify import evaluate
    from augbench.decoded import Rows

    n, n_classes = 600, 3
    images = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 8, 8, 3))
    labels = np.arange(n) % n_classes
    images[:] = (labels * 100)[:, None, None, None]  # an image's brightness is its class
    images.flush()
    seen: list[int] = []

    class Brightness(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(len(x))
            level = x.mean(dim=(1, 2, 3), keepdim=False)
            centres = torch.tensor([-2.0, 0.0, 2.0])
            return -(level[:, None] - centres[None]).abs()

    arr = np.load(tmp_path / "images.npy", mmap_mode="r")
    scored = evaluate(Brightness(), Rows([(arr, np.arange(n))]), labels, n_classes, torch.device("cpu"))
    assert seen == [256, 256, 88]
    assert scored["n_test"] == n and scored["per_class_top1"] == {0: 1.0, 1: 1.0, 2: 1.0} and scored["top1"] == 1.0
