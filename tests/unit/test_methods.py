"""The method registry: rows are checked when made, and the views the rules use follow from the rows."""

from __future__ import annotations

import pytest

from augbench.methods import ALL_METHODS, BASELINES, GENERATION_METHODS, PERSONALIZED, REGISTRY, RETRIEVAL_MODES, Method, method, names


def test_the_thirteen_rows_and_their_views() -> None:
    assert len(ALL_METHODS) == 13 and set(ALL_METHODS) == set(BASELINES) | set(RETRIEVAL_MODES) | set(GENERATION_METHODS)
    assert RETRIEVAL_MODES == {"retrieval_image": "image", "retrieval_text": "text"}
    assert set(PERSONALIZED) == {"textual_inversion", "cond_vectors", "cond_clusters", "textual_inversion_dm", "cond_vectors_dm",
                                 "shared_adapter"}
    assert names(finetune_unet=True) == ("textual_inversion_dm", "cond_vectors_dm", "shared_adapter")
    assert names(shared=True) == ("shared_adapter",)
    assert names(from_real=True) == ("img2img",)
    assert REGISTRY["real_x2"].real_splits == ("train", "train_extra") and REGISTRY["real"].real_splits == ("train",)


def test_sections_and_unused_keys_say_what_a_spec_reads() -> None:
    assert method("real").sections == () and method("retrieval_text").sections == ("retrieve", "fetch")
    assert method("prompt_classname").sections == ("generate",)
    assert method("cond_clusters").sections == ("personalize", "generate")
    assert method("cond_clusters").unused_keys("personalize") == {"dm_finetune", "dm_lr", "lora_rank", "shared_steps"}
    assert method("textual_inversion_dm").unused_keys("personalize") == {"cluster_size", "shared_steps"}
    assert method("shared_adapter").unused_keys("personalize") == {"cluster_size", "steps"}
    assert method("img2img").unused_keys("generate") == set()
    assert method("prompt_templates").unused_keys("generate") == {"strength", "prompt"}
    assert method("cond_vectors").unused_keys("generate") == {"strength", "prompt"}


@pytest.mark.parametrize("kwargs", [
    {"family": "retrieval"},                                          # no retrieval_mode
    {"family": "generated"},                                          # no prompt
    {"family": "generated", "prompt": "learned"},                     # learned prompt, nothing learned
    {"family": "generated", "prompt": "classname", "learns": "pseudo_word"},
    {"family": "generated", "prompt": "classname", "finetune_unet": True},
    {"family": "baseline", "prompt": "classname"},
    {"family": "generated", "prompt": "learned", "learns": "cond_vectors", "finetune_unet": True, "shared": True},
])
def test_inconsistent_rows_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="method x"):
        Method("x", **kwargs)


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method .img2imgg.; known: .*.img2img."):
        method("img2imgg")


def test_a_rows_generate_settings_cannot_be_changed_after_the_fact() -> None:
    row = Method("x", "generated", prompt="classname", from_real=True, generate={"strength": 0.9})
    with pytest.raises(TypeError):
        row.generate["strength"] = 0.1  # type: ignore[index]


def test_row_names_with_a_generator_and_a_filter_parse_back() -> None:
    import re

    from augbench.methods import filter_of, generator_name, row_pattern, unfiltered

    row = "textual_inversion@sd1.5-g7.5+clip_top"
    assert method(row).name == "textual_inversion" and generator_name(row) == "sd1.5" and filter_of(row) == "clip_top"
    assert unfiltered(row) == "textual_inversion@sd1.5-g7.5" and filter_of(unfiltered(row)) == ""
    assert method("retrieval_text+best").retrieval_mode == "text" and generator_name("retrieval_text+best") == ""
    gen = GENERATION_METHODS
    assert re.fullmatch(row_pattern(gen), row) and re.fullmatch(row_pattern(gen, filtered=True), row)
    assert not re.fullmatch(row_pattern(gen, filtered=False), row)
    assert re.fullmatch(row_pattern(gen, filtered=False), unfiltered(row))
    assert not re.fullmatch(row_pattern(gen, filtered=True), unfiltered(row))
