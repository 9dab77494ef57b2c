"""Geometry: personalisation and img2img see squares cut from the photo (shorter side resized, then cropped), never a
squashed photo. A 3:1 panorama painted red | green | blue in thirds: the centre crop is green, the crops at the ends
red and blue, and no crop mixes two thirds, as a squash to a square would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from augbench.personalize import class_images, class_views, encode_latents, load_pipeline, train_personalization
from augbench.specs import PersonalizeSpec

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 40), (30, 40, 210)


def _panoramas(root: Path) -> Path:
    """Class 0: a 3:1 landscape and a 1:3 portrait (thirds red, green, blue), and a square; class 1: one square."""
    rows = []
    for name, size, label in (("wide.jpg", (96, 32), 0), ("tall.png", (32, 96), 0), ("square.png", (32, 32), 0),
                              ("other.png", (20, 20), 1)):
        img = Image.new("RGB", size, (120, 120, 120))
        if size[0] != size[1]:
            for k, colour in enumerate((RED, GREEN, BLUE)):
                box = (32 * k, 0, 32 * (k + 1), 32) if size[0] > size[1] else (0, 32 * k, 32, 32 * (k + 1))
                img.paste(colour, box)
        img.save(root / name, quality=95)
        rows.append({"path": name, "label": label, "class": f"c{label}"})
    pd.DataFrame(rows).to_parquet(root / "train.parquet")
    return root / "train.parquet"


def _colour(view: np.ndarray) -> tuple[int, ...]:
    """The view's colour, asserting it is one colour (no squashed mix of two thirds)."""
    centre = view[4:-4, 4:-4].reshape(-1, 3).astype(int)
    spread = centre.max(0) - centre.min(0)
    assert (spread <= 24).all(), f"a crop mixes colours (spread {spread})"
    return tuple(int(c) for c in np.median(centre, axis=0))


def _near(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 20


def test_img2img_sources_are_the_centre_square_of_each_photo(tmp_path: Path) -> None:
    images = class_images(_panoramas(tmp_path), tmp_path, 0, 16)
    assert images.shape == (3, 16, 16, 3)
    assert _near(_colour(images[0]), GREEN) and _near(_colour(images[1]), GREEN), "the centre of a 3:1 photo is its middle third"


def test_personalisation_crops_are_the_centre_and_both_ends_never_a_squash(tmp_path: Path) -> None:
    views, owner = class_views(_panoramas(tmp_path), tmp_path, 0, 16)
    assert owner.tolist() == [0, 0, 0, 1, 1, 1, 2], "three crops of each panorama, one of the square"
    colours = [_colour(v) for v in views]
    for i in (0, 3):  # the centre first, then the two ends
        assert _near(colours[i], GREEN) and {_near(colours[i + 1], RED), _near(colours[i + 2], RED)} == {True, False}
        assert any(_near(colours[i + j], BLUE) for j in (1, 2))


def test_every_crop_of_an_image_trains_that_images_vector(tmp_path: Path, tiny_sd: Path) -> None:
    views, owner = class_views(_panoramas(tmp_path), tmp_path, 0, 16)
    pipe = load_pipeline(tiny_sd)
    latents = encode_latents(pipe, views)
    assert latents.shape[0] == 2 * len(views)
    spec = PersonalizeSpec(method="cond_vectors", steps=3, batch_size=4)
    learned = train_personalization(pipe, latents, np.arange(3), "c0", "c0", spec, owner)
    assert learned.cond["prompt_embeds"].shape[0] == 3 and learned.assign.tolist() == [0, 1, 2]
    assert torch.isfinite(torch.tensor(learned.final_loss))
