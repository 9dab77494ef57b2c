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


SPEC_SECTIONS = {  # config section (path in the schema) -> the spec the workflow builds from it
    ("world",): "WorldSpec", ("download",): "DownloadSpec", ("clip", "train"): "ClipSpec", ("embed",): "EmbedSpec",
    ("index",): "IndexSpec", ("retrieve",): "RetrieveSpec", ("fetch",): "FetchSpec", ("diffusion", "train"): "DiffusionSpec",
    ("personalize",): "PersonalizeSpec", ("generate",): "GenerateSpec", ("train",): "TrainSpec", ("target",): "TargetSpec",
}


def _schema_section(path: tuple[str, ...]) -> dict:
    from pathlib import Path

    import yaml

    node = yaml.safe_load((Path(__file__).parents[2] / "workflow/schemas/config.schema.yaml").read_text())
    for key in path:
        node = node["properties"][key]
    return node["properties"]


def _norm(v: object) -> object:
    return list(v) if isinstance(v, tuple) else v


@pytest.mark.parametrize("path", list(SPEC_SECTIONS), ids=".".join)
def test_schema_and_spec_defaults_agree(path: tuple[str, ...]) -> None:
    """One value per default: a key the schema fills in must have the dataclass's default, or the two drift apart."""
    import dataclasses

    import augbench.specs
    import augbench.target

    cls = getattr(augbench.specs, SPEC_SECTIONS[path], None) or getattr(augbench.target, SPEC_SECTIONS[path])
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
                for f in dataclasses.fields(cls)}
    props = _schema_section(path)
    checked = 0
    for key, prop in props.items():
        if key in defaults and "default" in prop:
            where = f"{'.'.join(path)}.{key}"
            assert _norm(prop["default"]) == _norm(defaults[key]), f"{where}: schema {prop['default']!r}, {cls.__name__} {defaults[key]!r}"
            checked += 1
    derived = {"version", "method", "mode", "n_aug", "n_images", "prompts", "overfetch"}  # set by the workflow, not a key
    derived |= {"FetchSpec": {"leak_pixel_mad"}}.get(cls.__name__, set())  # fetch confirms leaks with retrieve's threshold
    content = [k for k in defaults if k not in derived]
    # every setting of the spec is a config key (a spec field no config can set is a hidden constant)
    missing = [k for k in content if k not in props]
    assert not missing, f"{cls.__name__} fields with no config key in {'.'.join(path)}: {missing}"
    # the section was found and compared: a lookup that matched nothing would check nothing and pass
    assert props, f"no schema section {'.'.join(path)}"
    assert checked or not any("default" in prop for prop in props.values()), (cls.__name__, "no default compared")


def test_specs_hold_no_thread_or_process_counts() -> None:
    """Threads change how fast a job runs, not what it makes: a spec (compared by Snakemake) must not hold them."""
    import dataclasses

    import augbench.specs

    for name in SPEC_SECTIONS.values():
        cls = getattr(augbench.specs, name, None)
        if cls is not None:
            names = {f.name for f in dataclasses.fields(cls)}
            assert not names & {"threads", "processes_count", "thread_count"}, name


def test_every_stage_version_is_read_by_the_workflow() -> None:
    """A stage version nobody reads is a promise ("bump it and the stage reruns") that is not kept."""
    import re
    from pathlib import Path

    from augbench.specs import STAGE_VERSIONS

    rules = "\n".join(p.read_text() for p in (Path(__file__).parents[2] / "workflow/rules").glob("*.smk"))
    for stage in STAGE_VERSIONS:
        assert re.search(rf'(stage_spec|method_spec)\("{stage}"|STAGE_VERSIONS\["{stage}"\]', rules), stage


def test_a_setting_added_later_stays_out_of_the_cache_key_at_its_default() -> None:
    """generate.vae_tiling came after results existed: at its default (False, what they were made with) it is not part
    of the chunk cache's identity, so those chunks stay valid; turned on, it is (it may change pixels at seams)."""
    from augbench.generate import cache_ident, cache_key
    from augbench.specs import GenerateSpec

    plain = cache_ident(GenerateSpec(), "some/model", "cat", None)
    assert "vae_tiling" not in plain["spec"] and "steps" in plain["spec"]
    tiled = cache_ident(GenerateSpec(vae_tiling=True), "some/model", "cat", None)
    assert tiled["spec"]["vae_tiling"] is True and cache_key(tiled) != cache_key(plain)
