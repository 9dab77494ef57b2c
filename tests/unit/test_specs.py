"""Specs refuse unknown keys; derived seeds are stable and independent of order."""

import pytest

from augbench.specs import RetrieveSpec, TrainSpec, canonical_json, item_seed, parse_spec


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match="k_per_qeury"):
        parse_spec(RetrieveSpec, '{"k_per_qeury": 5}')


def test_known_keys_parse() -> None:
    spec = parse_spec(TrainSpec, canonical_json({"arch": "resnet50", "epochs": 2}))
    assert spec.arch == "resnet50" and spec.epochs == 2


def test_retrieve_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="mode"):
        RetrieveSpec(mode="audio")


def test_item_seed_depends_on_every_key_only() -> None:
    a = item_seed(0, "generate", "star", 3)
    assert a == item_seed(0, "generate", "star", 3)
    assert a != item_seed(0, "generate", "star", 4)
    assert a != item_seed(1, "generate", "star", 3)
    assert 0 <= a < 2**63


def test_clip_imagenet_templates_are_80_distinct_with_one_slot() -> None:
    from augbench.prompts import IMAGENET_TEMPLATES

    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)


def test_generation_seeds_depend_on_method_class_and_index_only() -> None:
    from augbench.generate import plan
    from augbench.specs import GenerateSpec

    a = plan(GenerateSpec(method="prompt_templates", n_images=3), "circle", "circle", 5)
    b = plan(GenerateSpec(method="prompt_templates", n_images=99, batch_size=4), "circle", "circle", 3)
    assert list(a["seed"][:3]) == list(b["seed"]) and a["seed"].is_unique
    assert list(a["prompt"][:2]) == ["a bad photo of a circle.", "a photo of many circle."]
    other = plan(GenerateSpec(method="prompt_classname"), "circle", "circle", 3)
    assert set(other["seed"]).isdisjoint(a["seed"])
