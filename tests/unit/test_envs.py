"""The conda environment of `--sdm conda`: one file for every rule, pinning the whole stack within pyproject's ranges.

Every job runs `python -m augbench <stage>` and the stages share one library, so the workflow ships one environment
(envs/augbench.yaml) rather than per-rule ones that would each install the same stack (docs/development.md says why).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
ENV = REPO / "envs" / "augbench.yaml"


def _rules() -> dict[str, str | None]:
    """Each rule of the workflow that runs a command, with the conda file it names (None: none)."""
    rules: dict[str, str | None] = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=\s*rule \w+:)", smk.read_text()):
            head = re.match(r"\s*rule (\w+):", block)
            if not head or not re.search(r"^\s*(shell|run|script):", block, re.M):
                continue
            conda = re.search(r"^\s*conda:\s*\n\s*\"([^\"]+)\"", block, re.M)
            rules[head.group(1)] = conda.group(1) if conda else None
    return rules


def _pins() -> dict[str, str]:
    spec = yaml.safe_load(ENV.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = {}
    for line in pip:
        if line.startswith("-e"):
            continue
        req = Requirement(line)
        assert str(req.specifier).startswith("=="), f"{ENV.name}: {line!r} is not pinned with =="
        pins[req.name.lower().replace("_", "-")] = str(req.specifier)[2:]
    return pins


def test_every_rule_that_runs_a_command_uses_the_one_environment() -> None:
    rules = _rules()
    assert len(rules) >= 25, sorted(rules)  # the parse found the workflow's rules
    wrong = {r: c for r, c in rules.items() if c != "../../envs/augbench.yaml"}
    assert not wrong, f"rules without envs/augbench.yaml: {wrong}"
    assert sorted(p.name for p in (REPO / "envs").glob("*.yaml")) == ["augbench.yaml"]


def test_the_environment_pins_every_dependency_within_pyproject_and_installs_the_project() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{ENV.name} does not pin {req.name} (pyproject: {dep})"
        assert req.specifier.contains(pins[name], prereleases=True), f"{ENV.name}: {name}=={pins[name]} is outside {dep}"
    spec = yaml.safe_load(ENV.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-e ../" in pip, "the environment must install augbench itself (the jobs run python -m augbench)"
    python = next(d for d in spec["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(
        map(int, re.findall(r"\d+", project["requires-python"])[:2]))
