"""Plan a cluster run before submitting it: every rule's jobs and what each asks for, checked against the site.

`augbench plan CONFIG... --profile profiles/slurm --site profiles/slurm/site.yaml` runs Snakemake's dry run with the
profile (so every job's resources are what the workflow computes from the config and the profile sets), reads the site
file (each partition's limits: a Snakemake profile cannot hold keys of its own) and prints, per rule: jobs, partition,
GPUs, CPUs, memory and runtime per job; the totals (GPU-hours requested, shared disk for the decode cache and the
generated images); and the per-unit rates the GPU runtimes come from, each marked measured or estimated with its source.

It exits 1, naming the rule, when a job's runtime, memory or CPUs exceed its partition's limits, when a job that asks
for a GPU is routed to a partition without GPUs, or when a group allocation (block chains personalise -> generate
sharing one GPU) exceeds the partition's runtime or the GPU's memory; and it prints the `class_block` and `gpu_share`
that would fit the site. The config decides those two (the DAG must not change with the site), so the plan only
suggests them.

The GPU runtimes that the rules request come from here too (`personalize_minutes`, `generate_minutes`,
`train_minutes`): work / rate x `MARGIN` + `OVERHEAD_MIN`, with the rate divided by `gpu_share` (the block chains that
share one GPU each get a share of it: the bound for GPU-bound jobs).
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from augbench.architectures import REGISTRY, Architecture, architecture
from augbench.methods import generator_name, row_name
from augbench.methods import method as registry_row


@dataclass(frozen=True)
class Rate:
    """A per-unit cost a runtime is computed from, and where the figure comes from."""

    value: float
    unit: str
    source: str

    @property
    def measured(self) -> bool:
        return self.source.startswith("measured")


_H200 = "measured: one H200, scripts/gpu_smoke.py (Stable Diffusion v1 shapes, random weights, 512 px)"
RATES: dict[str, Rate] = {
    "personalize_pseudo_word": Rate(5.3, "steps/s at batch 4", _H200),
    "personalize_cond_vectors": Rate(5.3, "steps/s at batch 4", "estimate: the pseudo-word rate (no text-encoder pass: a bound)"),
    "personalize_lora": Rate(4.2, "steps/s at batch 4", _H200),
    "personalize_full": Rate(2.1, "steps/s at batch 4", "estimate: half the LoRA rate (AdamW over the 860 M fp32 UNet)"),
    "generate": Rate(3.8, "images/s at 25 steps, batch 8", _H200 + ", through augbench generate"),
    "train": Rate(1200.0, "images/s", _H200.replace("Stable Diffusion v1 shapes, random weights, 512 px",
                                                     "ResNet-50, bf16, augbench's loop over the decode cache")),
}
MARGIN = 1.5  # runtime requests are the estimate times this ...
OVERHEAD_MIN = 15  # ... plus this (start, model load, writing)

GENERATE_ACTIVATION_MB = 350.0  # per image of a generation batch at 512 px in fp16 (estimate: SD v1 UNet with SDPA, CFG x2)


def _kind(method: str, dm_finetune: str) -> str:
    m = registry_row(method)
    if m.finetune_unet:
        return "full" if dm_finetune == "full" else "lora"
    return "pseudo_word" if m.learns == "pseudo_word" else "cond_vectors"


def _share(config: dict) -> int:
    return max(1, int(config.get("gpu_share") or 1))


def generator_settings(config: dict, row: str) -> tuple[Architecture, dict]:
    """The architecture and the generate settings of a results row `<method>@<generator>[-g<scale>]` (or of a
    personalisation job `<method>@<generator>`): the `generate` section with the generator's options over it. Without
    `generators`, or where the architecture is `auto` (read from the folder when loaded), Stable Diffusion v1: the
    rates' reference."""
    g = dict(config["generate"])
    gens = config.get("generators") or {}
    name = generator_name(row) if generator_name(row) in gens else None
    declared = config.get("diffusion", {}).get("architecture", "auto")
    if name is not None:
        opts = gens[name]
        g.update({k: v for k, v in opts.items() if k not in ("model", "revision", "architecture", "guidance_scale")})
        declared = opts.get("architecture", "auto")
    arch = architecture(declared if declared in REGISTRY else "sd")
    return arch, g


def personalize_minutes(config: dict, method: str, classes: int) -> int:
    """The runtime to request for a personalize block of `classes` classes (minutes, first attempt): steps at the rate
    of the method kind, measured on Stable Diffusion v1 at 512 px, divided by the row's architecture's step cost at
    the personalisation resolution (`Architecture.step_cost`)."""
    p = config["personalize"]
    arch, _ = generator_settings(config, method)
    cost = arch.step_cost(p.get("resolution") or arch.resolution)
    rate = RATES[f"personalize_{_kind(method, p['dm_finetune'])}"].value * 4 / p["batch_size"] / cost
    steps = p["shared_steps"] if registry_row(method).shared else classes * p["steps"]  # shared: one run, all classes
    seconds = steps / rate * _share(config)
    return int(OVERHEAD_MIN + MARGIN * seconds / 60)


def generate_minutes(config: dict, method: str, classes: int, images_per_class: int) -> int:
    """The runtime to request for a generate block (minutes, first attempt) of a row (`method` may be a row
    `<method>@<generator>`): its generator's steps (img2img runs `strength` of them) at the rate measured on Stable
    Diffusion v1 at 512 px, divided by the architecture's step cost at the generator's resolution."""
    arch, g = generator_settings(config, method)
    steps = g["steps"] * (g["strength"] if registry_row(method).from_real else 1.0)
    rate = RATES["generate"].value * 25 / max(1.0, steps) / arch.step_cost(g.get("resolution") or arch.resolution)
    seconds = classes * images_per_class / rate * _share(config)
    return int(OVERHEAD_MIN + MARGIN * seconds / 60)


def train_minutes(config: dict, images: int) -> int:
    """The runtime to request for one training run over `images` images per epoch (minutes, first attempt)."""
    t = config["train"]
    seen = max(images * t["epochs"], t.get("min_steps", 0) * t["batch_size"])
    return int(OVERHEAD_MIN + MARGIN * seen / RATES["train"].value / 60)


def personalize_gpu_mb(config: dict, method: str) -> float:
    """One personalisation process's GPU memory (MB) for a row (`method` may be `<method>@<generator>`):
    `memory_estimate` on its architecture's counts (Stable Diffusion v1's exact SD1_PARAMS; other architectures'
    `Architecture.param_counts`, from their model cards), one conditioning vector per real image at most, activations
    scaled by the architecture's step cost at the personalisation side, with `personalize.gradient_checkpointing`."""
    from dataclasses import fields

    from augbench.personalize import SD1_PARAMS, memory_estimate
    from augbench.specs import PersonalizeSpec

    arch, _ = generator_settings(config, method)
    p = config["personalize"]
    names = {f.name for f in fields(PersonalizeSpec)} - {"method", "version"}
    spec = PersonalizeSpec(method=registry_row(method).name, **{k: v for k, v in p.items() if k in names})
    counts = SD1_PARAMS if arch.name == "sd" else arch.param_counts()
    side = spec.resolution or arch.resolution
    return memory_estimate(counts, spec.method, spec, vectors=config.get("real_per_class") or 130,
                           resolution=arch.resolution, step_cost=arch.step_cost(side),
                           gradient_checkpointing=bool(p.get("gradient_checkpointing")))["total_mb"]


def pipeline_host_mb(config: dict, row: str) -> float:
    """Host memory of a personalize or generate block's pipeline (MB): loaded once in fp32 (the pristine source of
    each class's copies), with room for the libraries; at least 8 GB (Stable Diffusion's measured need)."""
    arch, _ = generator_settings(config, row)
    return max(8000.0, arch.params_b * 4 * 1024 + 2000)


def generate_gpu_mb(config: dict, row: str = "") -> float:
    """One generation process's GPU memory (MB) for a row: its architecture's weights in fp16 (under `offload: model`
    the largest module, the one on the card at a time; `sequential`, one layer at a time: 1 GB planned) and a batch's
    activations (estimated per image for SD v1 at 512 px, scaled by the pixels: without gradients a step holds a few
    layers' activations at a time, which grow with the tokens, not with the depth)."""
    from augbench.personalize import CUDA_CONTEXT_MB

    arch, g = generator_settings(config, row)
    side = g.get("resolution") or arch.resolution
    offload = g.get("offload", "none")
    largest = max(arch.denoiser_params_b, arch.text_params_b)
    weights_gb = {"none": arch.weights_gb(), "model": round(largest * 2, 1), "sequential": 1.0}[offload]
    return weights_gb * 1024 + GENERATE_ACTIVATION_MB * g["batch_size"] * (side / 512) ** 2 + CUDA_CONTEXT_MB


# --- the dry run -------------------------------------------------------------------------------------------------

@dataclass
class Job:
    rule: str
    wildcards: dict[str, str]
    threads: int
    resources: dict[str, str]
    group: int | None = None  # index of the group job (allocation) it runs in


@dataclass
class Plan:
    jobs: list[Job]
    groups: dict[int, str] = field(default_factory=dict)  # group job index -> group name


_JOB = re.compile(r"^\s*(?:local)?rule (\w+):\s*$")
_GROUP = re.compile(r"^\[.*\] Group job (\S+)")


def _kv(text: str) -> dict[str, str]:
    out = {}
    for part in re.split(r",\s+(?=[A-Za-z_][\w]*=)", text.strip()):
        k, _, v = part.partition("=")
        out[k.strip()] = v.strip()
    return out


def parse_dry_run(text: str) -> Plan:
    """Jobs of a `snakemake -n` output: rule, wildcards, threads, resources, and the group job each belongs to."""
    plan = Plan(jobs=[])
    group: int | None = None
    job: Job | None = None
    for line in text.splitlines():
        g = _GROUP.match(line)
        if g:
            group = len(plan.groups)
            plan.groups[group] = g.group(1)
            continue
        if line.startswith("["):  # a job of its own (not indented under a group job)
            group = None
            continue
        m = _JOB.match(line)
        if m:
            job = Job(m.group(1), {}, 1, {}, group if line.startswith((" ", "\t")) else None)
            plan.jobs.append(job)
            continue
        if job is None:
            continue
        key, _, value = line.strip().partition(": ")
        if key == "wildcards":
            job.wildcards = _kv(value)
        elif key == "threads":
            job.threads = int(value)
        elif key == "resources":
            job.resources = _kv(value)
    return plan


def dry_run(configfiles: list[Path], profile: Path, workdir: Path | None = None, snakefile: Path | None = None,
            group_components: dict[str, int] | None = None) -> str:
    """Snakemake's dry run of the workflow with the profile (and `--group-components` over the profile's, where given):
    every job and its resources."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--profile", str(profile), "--configfile", *map(str, configfiles)]
    if group_components:
        cmd += ["--group-components", *(f"{k}={v}" for k, v in group_components.items())]
    if snakefile:
        cmd += ["--snakefile", str(snakefile)]
    if workdir:
        cmd += ["--directory", str(workdir)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"plan: snakemake's dry run failed ({' '.join(cmd)}):\n{(res.stdout + res.stderr)[-3000:]}")
    return res.stdout + res.stderr


# --- checks ------------------------------------------------------------------------------------------------------

def _num(v: str | None, default: float = 0.0) -> float:
    try:
        return float(v) if v not in (None, "", "<TBD>") else default
    except ValueError:
        return default


def gpus(job: Job) -> int:
    """GPUs a job asks for: `gpu` (summed in a group) or a `gres` string such as gpu:1 / gpu:a100:2."""
    n = int(_num(job.resources.get("gpu")))
    gres = job.resources.get("gres", "")
    m = re.search(r"gpu(?::[\w-]+)?:(\d+)", gres)
    return max(n, int(m.group(1)) if m else (1 if gres.startswith("gpu") else 0))


def cpus(job: Job) -> int:
    per_gpu = int(_num(job.resources.get("cpus_per_gpu")))
    return max(job.threads, int(_num(job.resources.get("cpus_per_task"))), per_gpu * max(1, gpus(job)) if per_gpu else 0)


def load_site(path: Path) -> dict[str, dict]:
    """The site file: `partitions: {name: {max_runtime_min, max_mem_mb, max_cpus, gpus, gpu_mem_mb}}`."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    parts = data.get("partitions")
    if not isinstance(parts, dict) or not parts:
        raise ValueError(f"{path}: needs `partitions:` mapping each partition to its limits")
    known = {"max_runtime_min", "max_mem_mb", "max_cpus", "gpus", "gpu_mem_mb"}
    for name, limits in parts.items():
        unknown = set(limits or {}) - known
        if unknown:
            raise ValueError(f"{path}: partition {name}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    return parts


@dataclass
class Check:
    rows: list[dict]
    errors: list[str]
    totals: dict[str, float]
    suggestions: dict[str, int]
    groups: list[dict]


def check(plan: Plan, site: dict[str, dict], config: dict, profile: dict) -> Check:
    """Per-rule rows, totals and every way a job or a group allocation does not fit the site."""
    errors: list[str] = []
    by_rule: dict[str, list[Job]] = {}
    for job in plan.jobs:
        if job.rule != "all":
            by_rule.setdefault(job.rule, []).append(job)
    rows = []
    gpu_hours = 0.0
    for rule, jobs in by_rule.items():
        part = jobs[0].resources.get("slurm_partition", "")
        limits = site.get(part)
        runtime = max(_num(j.resources.get("runtime")) for j in jobs)
        mem = max(_num(j.resources.get("mem_mb")) for j in jobs)
        gpu, cpu = max(gpus(j) for j in jobs), max(cpus(j) for j in jobs)
        rows.append({"rule": rule, "jobs": len(jobs), "partition": part, "gpus": gpu, "cpus": cpu, "mem_mb": int(mem),
                     "runtime_min": int(runtime), "grouped": any(j.group is not None for j in jobs)})
        if limits is None:
            errors.append(f"rule {rule}: partition {part!r} is not in the site file (partitions: {sorted(site)})")
            continue
        if gpu and not limits.get("gpus"):
            errors.append(f"rule {rule}: asks for {gpu} GPU(s) but goes to partition {part!r}, which has no GPUs")
        if limits.get("max_runtime_min") and runtime > limits["max_runtime_min"]:
            errors.append(f"rule {rule}: runtime {runtime:.0f} min exceeds partition {part!r}'s limit of "
                          f"{limits['max_runtime_min']} min")
        if limits.get("max_mem_mb") and mem > limits["max_mem_mb"]:
            errors.append(f"rule {rule}: {mem:.0f} MB of memory exceeds partition {part!r}'s {limits['max_mem_mb']} MB")
        if limits.get("max_cpus") and cpu > limits["max_cpus"]:
            errors.append(f"rule {rule}: {cpu} CPUs exceed partition {part!r}'s {limits['max_cpus']}")
        if gpu:
            gpu_hours += sum(_num(j.resources.get("runtime")) * gpus(j) for j in jobs if j.group is None) / 60
    # group allocations: Snakemake sums runtime along a chain and takes the longest of parallel jobs; one GPU is shared
    groups = []
    share = _share(config)
    components = int((profile.get("group-components") or {}).get(next(iter((profile.get("groups") or {}).values()), ""), 1))
    if plan.groups and components != share:
        errors.append(f"profile group-components ({components}) differs from the config's gpu_share ({share}): runtimes "
                      f"assume {share} block chains per GPU")
    for index, name in plan.groups.items():
        members = [j for j in plan.jobs if j.group == index]
        layers: dict[str, list[Job]] = {}
        for j in members:
            layers.setdefault(j.rule, []).append(j)
        runtime = sum(max(_num(j.resources.get("runtime")) for j in js) for js in layers.values())
        chains = max(len(js) for js in layers.values())
        per_process = max([personalize_gpu_mb(config, j.wildcards["method"]) for j in layers.get("personalize", [])]
                          + [generate_gpu_mb(config, j.wildcards["method"]) for j in layers.get("generate", [])])
        part = members[0].resources.get("slurm_partition", "")
        limits = site.get(part, {})
        g = {"group": name, "index": index, "rules": sorted(layers), "chains": chains, "runtime_min": int(runtime),
             "gpu_mb": round(chains * per_process), "partition": part}
        groups.append(g)
        gpu_hours += runtime / 60
        if limits.get("max_runtime_min") and runtime > limits["max_runtime_min"]:
            errors.append(f"group {name} ({', '.join(sorted(layers))}): {chains} chains need {runtime:.0f} min in one "
                          f"allocation, over partition {part!r}'s limit of {limits['max_runtime_min']} min")
        if limits.get("gpu_mem_mb") and chains * per_process > limits["gpu_mem_mb"]:
            errors.append(f"group {name} ({', '.join(sorted(layers))}): {chains} processes x {per_process:.0f} MB of GPU "
                          f"memory exceed one GPU's {limits['gpu_mem_mb']} MB in partition {part!r}")
    totals = {"gpu_hours_requested": round(gpu_hours, 1), **disk_gb(config)}
    totals["by_generator"] = by_generator(plan, config)
    return Check(rows, errors, totals, suggest(config, site, profile), groups)


def by_generator(plan: Plan, config: dict) -> dict[str, float]:
    """GPU-hours requested per generator (the rows `<method>@<generator>[-g<scale>]`): its personalize, generate,
    collect, statistics and training jobs, a grouped job's runtime shared `gpu_share` ways (the chains of one
    allocation share its GPU). Empty without `generators`."""
    gens = config.get("generators") or {}
    out: dict[str, float] = dict.fromkeys(gens, 0.0)
    for job in plan.jobs:
        name = generator_name(job.wildcards.get("method", ""))
        if name in gens and gpus(job):
            share = _share(config) if job.group is not None else 1
            out[name] += _num(job.resources.get("runtime")) * gpus(job) / share / 60
    return {k: round(v, 1) for k, v in out.items()}


def disk_gb(config: dict) -> dict[str, float]:
    """Shared disk the run writes that grows with it: the decode cache (uint8 squares) and the generated images."""
    from augbench.methods import GENERATION_METHODS

    classes = int(config.get("_classes") or 0)
    side = config["train"].get("load_size") or config["train"]["input_size"]
    per_class_real = config.get("real_per_class") or 130
    n_max = int(config.get("_n_aug_max") or 0)
    # each generated method is a row per generator variant (guidance scale) with `generators`
    gens = config.get("generators") or {}
    variants = sum(len(g["guidance_scale"]) if isinstance(g.get("guidance_scale"), list) else 1
                   for g in gens.values()) or 1
    generated = [m for m in config["methods"] if m in GENERATION_METHODS] * variants
    augmented = [m for m in config["methods"] if m not in ("real", "real_x2") and m not in GENERATION_METHODS] + generated
    decoded = classes * (2 * per_class_real + len(augmented) * n_max) * side * side * 3
    g = config["generate"]
    store = g.get("store_size") or g.get("resolution") or 512
    per_image = store * store * 3 * (0.5 if g["store_format"] == "png" else 0.12)  # bytes (estimate: compression ratio)
    return {"decode_cache_gb": round(decoded / 1e9, 1), "generated_gb": round(classes * n_max * len(generated) * per_image / 1e9, 1)}


def suggest(config: dict, site: dict[str, dict], profile: dict) -> dict[str, int]:
    """The `class_block` and `gpu_share` that fit the GPU partition of the personalize rule (0 where none is named)."""
    part = (((profile.get("set-resources") or {}).get("personalize") or {}).get("slurm_partition")) or ""
    limits = site.get(part) or {}
    gens = list(config.get("generators") or {})
    methods = [row_name(m, g) for m in config["methods"] if registry_row(m).personalized for g in (gens or [""])]
    out = {}
    if limits.get("gpu_mem_mb"):
        per = max([personalize_gpu_mb(config, m) for m in methods]
                  + [generate_gpu_mb(config, row_name("prompt_classname", g)) for g in (gens or [""])])
        out["gpu_share"] = max(1, int(limits["gpu_mem_mb"] * 0.9 // per))
    if limits.get("max_runtime_min") and methods:
        n = int(config.get("_n_aug_max") or 0)

        def chain(block: int) -> int:
            return max(personalize_minutes(config, m, block) + generate_minutes(config, m, block, n) for m in methods)

        block = 1
        while block < 10_000 and chain(block + 1) <= 0.9 * limits["max_runtime_min"]:
            block += 1
        out["class_block"] = block if chain(1) <= limits["max_runtime_min"] else 0
    return out


def render(result: Check, plan: Plan) -> str:
    lines = [f"{'rule':<22} {'jobs':>5} {'partition':<10} {'GPUs':>4} {'CPUs':>4} {'mem MB':>8} {'runtime min':>11}  grouped"]
    for r in result.rows:
        lines.append(f"{r['rule']:<22} {r['jobs']:>5} {r['partition']:<10} {r['gpus']:>4} {r['cpus']:>4} {r['mem_mb']:>8} "
                     f"{r['runtime_min']:>11}  {'yes' if r['grouped'] else ''}")
    if result.groups:
        longest = max(result.groups, key=lambda g: g["runtime_min"])
        lines.append(f"\ngroup allocations: {len(result.groups)} ({longest['group']}: up to {longest['chains']} chains "
                     f"{' -> '.join(longest['rules'])}, {longest['runtime_min']} min, {longest['gpu_mb']} MB of GPU memory)")
    t = result.totals
    lines.append(f"\njobs: {len([j for j in plan.jobs if j.rule != 'all'])}; GPU-hours requested: {t['gpu_hours_requested']}"
                 f" (runtime requests: estimate x {MARGIN} + {OVERHEAD_MIN} min); shared disk: decode cache "
                 f"{t['decode_cache_gb']} GB, generated images {t['generated_gb']} GB")
    if t.get("by_generator"):
        lines.append("GPU-hours requested by generator (its rows' jobs): "
                     + ", ".join(f"{k} {v:g}" for k, v in t["by_generator"].items()))
    lines.append("\nrates the GPU runtimes come from:")
    for name, rate in RATES.items():
        lines.append(f"  {name:<26} {rate.value:>7g} {rate.unit:<30} {rate.source}")
    if result.suggestions:
        lines.append("\nfits this site: " + ", ".join(f"{k} <= {v}" for k, v in result.suggestions.items())
                     + " (set in the config; the site does not change the DAG)")
    for e in dict.fromkeys(result.errors):  # one line per distinct problem, with how many jobs or groups have it
        n = result.errors.count(e)
        lines.append(f"error: {e}" + (f" ({n} allocations)" if n > 1 else ""))
    return "\n".join(lines)


def run(configfiles: list[Path], profile: Path, site: Path, workdir: Path | None = None,
        snakefile: Path | None = None, group_components: int | None = None) -> tuple[int, str]:
    """The plan's exit code and its printed table; `group_components` overrides the profile's block chains per GPU
    allocation (as `snakemake --group-components <group>=N` does for the run)."""
    prof = yaml.safe_load((Path(profile) / "config.yaml").read_text()) or {}
    groups = None
    if group_components is not None:
        groups = {name: group_components for name in set((prof.get("groups") or {}).values())}
        prof["group-components"] = {**(prof.get("group-components") or {}), **groups}
    text = dry_run(configfiles, profile, workdir, snakefile, groups)
    plan = parse_dry_run(text)
    config = _config(configfiles)
    config["_classes"] = _classes(text, config)
    result = check(plan, load_site(site), config, prof)
    return (1 if result.errors else 0), render(result, plan)


def _config(configfiles: list[Path]) -> dict:
    """The merged config with the schema's defaults (as the workflow sees it)."""
    from snakemake.utils import validate

    repo = Path(__file__).resolve().parents[2]
    merged: dict = {}
    for f in [repo / "config.yaml", *configfiles]:
        _merge(merged, yaml.safe_load(Path(f).read_text()) or {})
    validate(merged, str(repo / "workflow" / "schemas" / "config.schema.yaml"), set_default=True)
    n = merged.get("n_aug") or []
    per = merged.get("real_per_class") or 1
    merged["_n_aug_max"] = max(int(v) if isinstance(v, int) else round(float(v[:-1]) * per) for v in n) if n else 0
    return merged


def _merge(a: dict, b: dict) -> None:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _merge(a[k], v)
        else:
            a[k] = v


def _classes(text: str, config: dict) -> int:
    """Classes of the run: the blocks' count times class_block is an upper bound; the dry run's job stats say blocks."""
    from augbench.target import CLASS_LISTS, _read_tsv

    cl = (config.get("target") or {}).get("class_list")
    if cl in CLASS_LISTS:
        return len(_read_tsv(CLASS_LISTS[cl]))
    blocks = {j for j in re.findall(r"block=(\d{4})", text)}
    return max(1, len(blocks)) * config.get("class_block", 50)
