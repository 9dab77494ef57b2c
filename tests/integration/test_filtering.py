"""Filtered rows (augbench.filtering): which candidates a filter keeps, scored by a real-architecture CLIP or by a
classifier checkpoint as `train` writes it, on non-square images with a broken one among them; and the yield the
report shows beside the other shortfalls."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import build_tiny_clip
from PIL import Image

from augbench.classify import build_model
from augbench.filtering import candidates, class_parts, filter_set, select
from augbench.imaging import open_rgb
from augbench.report import filter_note, yield_table
from augbench.shards import Sample, pointed_images, with_pointers, write_shard
from augbench.specs import FilterSpec, TrainSpec, parse_spec, spec_dict

WORDS = ("circle", "square", "triangle")
PER_CLASS = 8
BROKEN = "square_000003"  # bytes that are no image: dropped and counted, the run goes on


def test_select_keeps_in_candidate_order() -> None:
    score = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.8])
    assigned = np.array([True, False, True, True, False, True])
    # threshold: the first n that pass, in candidate order
    kept, passed = select(score, assigned, FilterSpec(threshold=0.5), 2)
    assert kept.tolist() == [1, 2] and passed == 4
    # top fraction: the best half (3 of 6), put back in candidate order, at most n
    kept, passed = select(score, assigned, FilterSpec(top_fraction=0.5), 3)
    assert kept.tolist() == [1, 3, 5] and passed == 3
    kept, _ = select(score, assigned, FilterSpec(top_fraction=0.5), 2)
    assert kept.tolist() == [1, 5], "n_aug 2 of 6 candidates: the best two"
    # neither: what the scorer assigns to the class
    kept, passed = select(score, assigned, FilterSpec(), 10)
    assert kept.tolist() == [0, 2, 3, 5] and passed == 4


def test_class_parts_give_each_class_once_whether_the_manifest_is_grouped_or_not(tmp_path: Path) -> None:
    """collect writes class by class (streamed across read batches of 4,096 rows); fetch may interleave classes."""
    rng = np.random.default_rng(0)
    grouped = pd.DataFrame({"label": np.repeat([2, 0, 1], 3000), "rank": np.tile(np.arange(3000), 3)})
    mixed = grouped.sample(frac=1.0, random_state=0).reset_index(drop=True)
    for name, frame in (("grouped", grouped), ("mixed", mixed)):
        frame.assign(key=rng.integers(0, 1 << 30, len(frame))).to_parquet(tmp_path / f"{name}.parquet", index=False)
        parts = list(class_parts(tmp_path / f"{name}.parquet"))
        assert sorted(int(p["label"].iat[0]) for p in parts) == [0, 1, 2], name
        for p in parts:
            assert p["label"].nunique() == 1 and p["rank"].tolist() == list(range(3000)), name


def test_candidates_per_class_and_bad_specs() -> None:
    assert candidates(FilterSpec(top_fraction=0.25), 5) == 20
    assert candidates(FilterSpec(top_fraction=0.3), 3) == 10
    assert candidates(FilterSpec(overgenerate=1.5), 5) == 8
    assert candidates(FilterSpec(), 4) == 8
    for bad, named in (({"threshold": 0.2, "top_fraction": 0.5}, "not both"), ({"score": "clipp"}, "clipp"),
                       ({"top_fraction": 1.5}, "top_fraction"), ({"overgenerate": 0.5}, "overgenerate")):
        with pytest.raises(ValueError, match=named):
            parse_spec(FilterSpec, bad)


def _image(word: str, i: int) -> bytes:
    """A non-square picture of the word's shape, in one of several colours and sizes."""
    rng = np.random.default_rng(hash((word, i)) % 2**32)
    w, h = 48 + 8 * (i % 3), 32 + 4 * (i % 2)
    arr = np.full((h, w, 3), 255, np.uint8)
    colour = rng.integers(0, 255, 3)
    if word == "circle":
        yy, xx = np.mgrid[:h, :w]
        arr[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 3) ** 2] = colour
    elif word == "square":
        arr[h // 4:3 * h // 4, w // 2 - h // 4:w // 2 + h // 4] = colour
    else:
        for r in range(h // 4, 3 * h // 4):
            half = (r - h // 4) // 2
            arr[r, w // 2 - half:w // 2 + half + 1] = colour
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(candidates manifest, classes.json, tiny CLIP folder): PER_CLASS candidates per class in one shard."""
    root = tmp_path_factory.mktemp("filtering")
    samples, rows = [], []
    for label, word in enumerate(WORDS):
        for i in range(PER_CLASS):
            key = f"{word}_{i:06d}"
            data = b"no image at all" if key == BROKEN else _image(word, i)
            samples.append(Sample(key=key, image=data, ext="png", caption="", record={}))
            rows.append({"key": key, "class": word, "label": label, "rank": i})
    (root / "candidates").mkdir()
    write_shard(root / "candidates/images.tar", samples)
    manifest = with_pointers(pd.DataFrame(rows), root / "candidates/images.tar", root / "candidates")
    manifest.to_parquet(root / "candidates/manifest.parquet", index=False)
    classes = root / "classes.json"
    classes.write_text(json.dumps({"classes": list(WORDS), "names": {w: w for w in WORDS}}))
    return root / "candidates/manifest.parquet", classes, build_tiny_clip(root / "clip", WORDS)


def test_clip_top_fraction_keeps_each_class_best_half_with_pointers_that_resolve(
        world: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from augbench.embed import Clip

    manifest, classes, clip_folder = world
    out = tmp_path / "row"
    stats = filter_set(manifest, classes, FilterSpec(top_fraction=0.5), 4, out / "manifest.parquet", out / "filter.json",
                       clip_folder, out_fidelity=out / "fidelity.json")
    kept = pd.read_parquet(out / "manifest.parquet")
    # the scores, computed here from CLIP directly: cosine with "a photo of a {name}."
    clip = Clip(clip_folder)
    text = clip.texts([f"a photo of a {w}." for w in WORDS])
    cands = pointed_images(manifest)
    for label, word in enumerate(WORDS):
        keys = [f"{word}_{i:06d}" for i in range(PER_CLASS) if f"{word}_{i:06d}" != BROKEN]
        score = clip.images([open_rgb(cands[k]) for k in keys]) @ text[label]
        half = round(len(keys) * 0.5)  # 4 of 8; 4 of the square's 7 decodable ones (round half to even: 3.5 -> 4)
        best = sorted(np.argsort(-score, kind="stable")[:min(4, half)])
        mine = kept[kept["label"] == label]
        assert mine["key"].tolist() == [keys[i] for i in best], word
        assert mine["rank"].tolist() == list(range(len(mine))), "ranks renumbered in candidate order"
        assert np.allclose(mine["filter_score"], score[best], atol=1e-5)
        assert stats["per_class"][word]["kept"] == len(best)
    assert stats["per_class"]["square"]["undecodable"] == 1 and stats["per_class"]["circle"]["undecodable"] == 0
    assert stats["candidates"] == 3 * PER_CLASS and stats["kept"] == len(kept)
    # the filtered set's pointers lead to the candidates' bytes (rebased to its own folder: nothing copied)
    assert pointed_images(out / "manifest.parquet") == {k: cands[k] for k in kept["key"]}
    fid = json.loads((out / "fidelity.json").read_text())
    assert fid["images"] == len(kept) and 0 <= fid["generation_fidelity"] <= 1
    (note,) = filter_note({"prompt_classname+best": out / "filter.json"})
    assert f"kept {len(kept)} of {3 * PER_CLASS} candidates" in note and "top 50%" in note


def test_a_threshold_above_every_score_keeps_nothing_and_says_so(world: tuple[Path, Path, Path], tmp_path: Path) -> None:
    manifest, classes, clip_folder = world
    out = tmp_path / "row"
    stats = filter_set(manifest, classes, FilterSpec(threshold=1.01), 3, out / "manifest.parquet", out / "filter.json",
                       clip_folder)
    assert stats["kept"] == 0 and stats["classes_short"] == 3 and pd.read_parquet(out / "manifest.parquet").empty
    y = yield_table([("prompt_classname+strict", 3)], {"prompt_classname+strict": out / "manifest.parquet"}, {},
                    list(WORDS), {"prompt_classname+strict": out / "filter.json"})
    assert y["reasons"].tolist() == [f"filtered_out {PER_CLASS}", f"filtered_out {PER_CLASS - 1}; undecodable 1",
                                     f"filtered_out {PER_CLASS}"]


def test_classifier_score_keeps_what_the_real_shot_classifier_assigns_to_the_class(
        world: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A classifier whose last layer ignores the image and prefers class 1: the argmax filter keeps class 1's candidates
    only, and the threshold filter reads its probabilities (softmax of the bias)."""
    manifest, classes, _ = world
    spec = TrainSpec(arch="resnet10", input_size=32, load_size=36, small_input_stem=True)
    model = build_model(spec, len(WORDS))
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([0.0, 2.0, 1.0]))
    ckpt = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "spec": spec_dict(spec), "seed": 0, "n_aug": 0}, ckpt)
    out = tmp_path / "row"
    stats = filter_set(manifest, classes, FilterSpec(score="classifier"), 5, out / "manifest.parquet", out / "filter.json",
                       classifier=ckpt)
    kept = pd.read_parquet(out / "manifest.parquet")
    assert kept["class"].tolist() == ["square"] * 5
    assert kept["key"].tolist() == [f"square_{i:06d}" for i in (0, 1, 2, 4, 5)], "the broken candidate is skipped"
    assert [stats["per_class"][w]["kept"] for w in WORDS] == [0, 5, 0]
    p = torch.tensor([0.0, 2.0, 1.0]).softmax(0).numpy()
    assert np.allclose(kept["filter_score"], p[1], atol=1e-5)
    # a threshold between class 2's probability and class 1's keeps class 1 only, too
    stats = filter_set(manifest, classes, FilterSpec(score="classifier", threshold=float(p[2] + p[1]) / 2), 5,
                       out / "m2.parquet", out / "f2.json", classifier=ckpt)
    assert [stats["per_class"][w]["kept"] for w in WORDS] == [0, 5, 0]
