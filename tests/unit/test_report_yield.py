"""The report's yield.csv: every (method, n_aug, class) short of n_aug with its reasons, and leaks counted from both
the merge and fetch."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from augbench.report import leaked_removed, yield_note, yield_table

CLASSES = ["cat", "dog", "crème brûlée"]


def _retrieval(tmp_path: Path) -> dict[str, dict[str, Path]]:
    # fetched at n_aug 4: cat 4, dog 2 (3 dead links, 1 leak, then out of candidates), crème brûlée 3
    manifest = pd.DataFrame({"label": [0] * 4 + [1] * 2 + [2] * 3, "rank": [0, 1, 2, 3, 0, 1, 0, 1, 2]})
    manifest.to_parquet(tmp_path / "manifest.parquet")
    (tmp_path / "stats.json").write_text(json.dumps({"leaked_removed": 2, "per_class": {
        "cat": {"leaked_removed": 2}, "dog": {"leaked_removed": 0}, "crème brûlée": {"leaked_removed": 0}}}))
    (tmp_path / "fetch_stats.json").write_text(json.dumps({
        "leaked_removed": 1, "leaked_per_class": {"dog": 1},
        "per_class_reasons": {"cat": {}, "dog": {"http_404": 3, "leaked": 1, "candidates_exhausted": 2},
                              "crème brûlée": {"content_changed": 5, "candidates_exhausted": 1}}}))
    return {"retrieval_image": {"manifest": tmp_path / "manifest.parquet", "stats": tmp_path / "stats.json",
                                "fetch_stats": tmp_path / "fetch_stats.json"}}


def test_every_short_class_is_listed_per_n_aug_with_its_reasons(tmp_path: Path) -> None:
    retrieval = _retrieval(tmp_path)
    manifests = {"retrieval_image": tmp_path / "manifest.parquet"}
    y = yield_table([("real", 0), ("retrieval_image", 2), ("retrieval_image", 4)], manifests, retrieval, CLASSES)
    assert list(zip(y["n_aug"], y["class"], y["achieved"], y["missing"], strict=True)) == [
        (4, "dog", 2, 2), (4, "crème brûlée", 3, 1)], "n_aug 2: every class has 2; n_aug 4: two classes short"
    dog = y[y["class"] == "dog"].iloc[0]
    assert dog["reasons"] == "http_404 3; candidates_exhausted 2; leaked 1" and dog["leaked_fetch"] == 1 and dog["leaked_merge"] == 0
    assert "content_changed 5" in y[y["class"] == "crème brûlée"].iloc[0]["reasons"]
    (note,) = yield_note(y)
    assert "retrieval_image n_aug 4: 2 class(es) short (lowest 2)" in note and "content_changed 5" in note


def test_a_generated_method_short_of_n_aug_is_listed_too(tmp_path: Path) -> None:
    pd.DataFrame({"label": [0, 0, 1, 1, 2], "rank": [0, 1, 0, 1, 0]}).to_parquet(tmp_path / "gen.parquet")
    y = yield_table([("prompt_classname", 2)], {"prompt_classname": tmp_path / "gen.parquet"}, {}, CLASSES)
    assert y[["class", "achieved", "reasons"]].values.tolist() == [["crème brûlée", 1, "not_generated 1"]]
    assert yield_table([("prompt_classname", 1)], {"prompt_classname": tmp_path / "gen.parquet"}, {}, CLASSES).empty


def test_leaks_removed_add_the_merge_and_fetch_counts(tmp_path: Path) -> None:
    files = _retrieval(tmp_path)["retrieval_image"]
    assert leaked_removed(files) == 3
    assert leaked_removed({**files, "fetch_stats": None}) == 2
