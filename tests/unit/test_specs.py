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
