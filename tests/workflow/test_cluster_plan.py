"""`augbench plan`: the ImageNet-10 % config under the shipped Slurm profile, checked against a site's limits.

The ImageNet and LAION trees are the fakes of test_real_configs (1,000 wnid folders, a clip-retrieval folder); the plan
runs Snakemake's real dry run with profiles/slurm as shipped. Each way a job or a group allocation can fail to fit is
then checked on that same dry run with one thing changed, and one failing site goes through the command itself.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_real_configs import _fake_imagenet, _fake_laion

from augbench.cli import main
from augbench.plan import _config, check, dry_run, gpus, load_site, parse_dry_run

PROFILE = REPO / "profiles" / "slurm"
SITE = PROFILE / "site.yaml"
GPU_RULES = {"personalize", "generate", "train", "train_judge", "embed_target", "collect_generated", "judge_generated", "image_stats",
             "search_block_gpu", "retrieve_gpu", "check_retrieved"}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    root = tmp_path_factory.mktemp("plan")
    paths = {"target": {"root": str(_fake_imagenet(root / "imagenet"))},
             "pool": {"embeddings": str(_fake_laion(root / "laion"))}, "report": {"judge": True}}
    (root / "site_paths.yaml").write_text(yaml.safe_dump(paths))
    (root / "wd").mkdir()
    return [REPO / "config/imagenet10.yaml", root / "site_paths.yaml"], root


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "0", "AUGBENCH_FORBID_TOY": "1"}


@pytest.fixture(scope="module")
def dry_text(imagenet: tuple[list[Path], Path]) -> str:
    """Snakemake's dry run of the ImageNet-10 % config with profiles/slurm as shipped (one per module: ~30 s)."""
    configs, root = imagenet
    old = dict(os.environ)
    os.environ.update(_env())
    try:
        return dry_run(configs, PROFILE, root / "wd")
    finally:
        os.environ.clear()
        os.environ.update(old)


@pytest.fixture(scope="module")
def planned(imagenet: tuple[list[Path], Path], dry_text: str):
    configs, _ = imagenet
    config = _config(configs)
    config["_classes"] = 1000
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    return parse_dry_run(dry_text), config, profile


def _plan_command(configs: list[Path], root: Path, site: Path, dry_text: str, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`augbench plan` through the CLI's main (its exit code and printed table), on the module's dry run."""
    import augbench.plan

    monkeypatch.setattr(augbench.plan, "dry_run", lambda *args, **kwargs: dry_text)
    code = main(["plan", *map(str, configs), "--profile", str(PROFILE), "--site", str(site), "--directory", str(root / "wd")])
    return code, capsys.readouterr().out


def test_imagenet10_fits_the_shipped_profile_and_a_24h_site(imagenet: tuple[list[Path], Path], dry_text: str,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    configs, root = imagenet
    code, table = _plan_command(configs, root, SITE, dry_text, monkeypatch, capsys)
    assert code == 0, table
    assert "GPU-hours requested" in table and "decode cache" in table and "error:" not in table
    assert "measured: one H200" in table and "estimate:" in table  # each rate says where it comes from
    assert "fits this site: gpu_share <= " in table and "class_block <= " in table
    # every rule that asks for a GPU is in the GPU partition by the profile alone (no line to uncomment)
    rows = {line.split()[0]: line.split() for line in table.split("\n\n")[0].splitlines()
            if line.split() and line.split()[0] in GPU_RULES}
    assert set(rows) == GPU_RULES, sorted(rows)
    assert all(r[2] == "gpu" and int(r[3]) >= 1 for r in rows.values()), rows


def test_each_way_of_not_fitting_is_named(planned) -> None:
    plan, config, profile = planned
    site = load_site(SITE)
    assert check(plan, site, config, profile).errors == []

    def errors(site_change=None, job_change=None, config_change=None, profile_change=None) -> list[str]:
        s, p, c, pr = copy.deepcopy(site), copy.deepcopy(plan), copy.deepcopy(config), copy.deepcopy(profile)
        for fn, obj in ((site_change, s), (job_change, p), (config_change, c), (profile_change, pr)):
            if fn:
                fn(obj)
        return check(p, s, c, pr).errors

    # a GPU partition with a 6 h limit: the personalize jobs and the group allocations are too long
    short = errors(site_change=lambda s: s["gpu"].update(max_runtime_min=360))
    assert any(e.startswith("rule personalize: runtime") for e in short), short
    assert any(e.startswith("group per_class_gpu") and "allocation" in e for e in short), short
    # a GPU rule routed to the CPU partition (as judge_generated and search_block were before)
    def to_cpu(plan) -> None:
        for j in plan.jobs:
            if j.rule == "judge_generated":
                j.resources["slurm_partition"] = "cpu"
    routed = errors(job_change=to_cpu)
    assert routed == ["rule judge_generated: asks for 1 GPU(s) but goes to partition 'cpu', which has no GPUs"]
    # memory per job, and one GPU's memory for a group of four processes
    assert any(e.startswith("rule generate:") and "memory" in e
               for e in errors(site_change=lambda s: s["gpu"].update(max_mem_mb=6000)))
    small_gpu = errors(site_change=lambda s: s["gpu"].update(gpu_mem_mb=12000))
    assert small_gpu and all("GPU memory" in e for e in small_gpu), small_gpu
    # the profile shares a GPU among more chains than the runtimes were computed for
    mismatch = errors(profile_change=lambda p: p["group-components"].update(per_class_gpu=8))
    assert any("group-components (8) differs from the config's gpu_share (4)" in e for e in mismatch), mismatch
    assert all(gpus(j) >= 1 for j in plan.jobs if j.rule in GPU_RULES)


def test_the_command_exits_non_zero_naming_the_rule(imagenet: tuple[list[Path], Path], dry_text: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    configs, root = imagenet
    site = yaml.safe_load(SITE.read_text())
    site["partitions"]["gpu"]["max_runtime_min"] = 120
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))
    code, table = _plan_command(configs, root, tmp_path / "site.yaml", dry_text, monkeypatch, capsys)
    assert code != 0
    assert "error: rule personalize: runtime" in table and "error: rule train: runtime" in table, table[-2000:]


def test_the_generator_sweep_fits_with_one_chain_per_gpu_and_prices_each_generator(
        imagenet: tuple[list[Path], Path]) -> None:
    """config/generators_imagenet10.yaml (SD 1.5, SDXL, SD 3.5 medium, FLUX.1-schnell) over the ImageNet-10 % config,
    planned with the profile's group components at the sweep's gpu_share of 1: every job and allocation fits the
    shipped site, and each generator's GPU-hours follow its step cost (counted FLOPs) and its steps."""
    from augbench.plan import run

    configs, root = imagenet
    sweep = [configs[0], REPO / "config/generators_imagenet10.yaml", *configs[1:]]
    old = dict(os.environ)
    os.environ.update(_env())
    try:
        code, table = run(sweep, PROFILE, SITE, root / "wd", group_components=1)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert code == 0, table
    line = next(x for x in table.splitlines() if x.startswith("GPU-hours requested by generator"))
    hours = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
    hours = {k: float(v) for k, v in hours.items()}
    assert set(hours) == {"sd15", "sdxl", "sd35", "schnell"}, hours
    assert hours["sd15"] < min(hours["sdxl"], hours["sd35"], hours["schnell"]), hours
    assert "per_class_gpu: up to 1 chains" in table and "error:" not in table
