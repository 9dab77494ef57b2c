"""The workflow through a real single-node Slurm (Debian's packages) with `profiles/slurm`.

The fixture installs Slurm when it can (root + apt; `.ci/run` does this), starts munged, slurmctld
and slurmd with a fake GPU (scripts/slurm/start.sh), and stops them by their PIDs afterwards. Every
snakemake call is bounded by a timeout, so a lost job cannot hang CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO, scheduled_jobs, subprocess_env

pytestmark = pytest.mark.slow
SCRIPTS = REPO / "scripts/slurm"
GPU_RULES = {"pretrain_clip", "pretrain_diffusion", "embed_pool", "embed_target", "personalize", "generate", "collect_generated",
             "judge_generated", "image_stats", "train", "train_judge"}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _cannot(why: str) -> None:
    """No test cluster here: a skip on a developer's machine, a failure where it is required (CI: .ci/run sets
    AUGBENCH_REQUIRE_SLURM=1), so a broken install never passes as 'skipped'."""
    if os.environ.get("AUGBENCH_REQUIRE_SLURM") == "1":
        pytest.fail(f"the test Slurm cluster is required (AUGBENCH_REQUIRE_SLURM=1) and {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def slurm() -> Iterator[None]:
    if not shutil.which("slurmctld") or not shutil.which("sbatch"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            _cannot("Slurm is not installed and cannot be installed here (needs root and apt-get)")
        res = _run(["bash", str(SCRIPTS / "install.sh")], timeout=600)
        if res.returncode != 0:
            _cannot(f"installing Slurm failed: {res.stderr[-500:]}")
    if os.geteuid() != 0:
        _cannot("starting a local Slurm needs root")
    res = _run(["bash", str(SCRIPTS / "start.sh")], timeout=120)
    if res.returncode != 0:  # stop whatever half-started, so the next run does not find our daemons still up
        _run(["bash", str(SCRIPTS / "stop.sh")], timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    # the cluster's own configuration: sbatch, squeue and the Snakemake plugin find it through SLURM_CONF
    # and its client wrappers first on PATH (exported into the jobs, whose nested srun loses SLURM_CONF)
    folder = Path(os.environ.get("AUGBENCH_SLURM_DIR", "/tmp/augbench-slurm"))
    before = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ["SLURM_CONF"] = str(folder / "etc/slurm.conf")
    os.environ["PATH"] = f"{folder / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        yield
    finally:
        _run(["bash", str(SCRIPTS / "stop.sh")], timeout=60)
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_test_cluster_leaves_a_sites_slurm_and_munge_alone(tmp_path: Path) -> None:
    """A machine with its own /etc/slurm/slurm.conf and a munged the test did not start: start.sh + stop.sh change neither."""
    if os.geteuid() != 0 or not all(shutil.which(x) for x in ("slurmctld", "slurmd", "munged", "sinfo")):
        _cannot("needs root and Debian's Slurm and munge packages")
    site_conf, site_pid = Path("/etc/slurm/slurm.conf"), Path("/run/munge/munged.pid")
    made_conf = not site_conf.exists()
    if made_conf:  # a machine without a Slurm of its own: plant one, removed afterwards
        site_conf.parent.mkdir(parents=True, exist_ok=True)
        site_conf.write_text("# a site's own Slurm configuration (planted by augbench's test)\nClusterName=site\n")
    conf_before = site_conf.read_bytes()
    started_munged = not (site_pid.exists() and _alive(int(site_pid.read_text())))
    if started_munged:  # the site's munge daemon, at its default socket and pid file
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        assert Path("/etc/munge/munge.key").exists(), "Debian's munge package installs /etc/munge/munge.key"
        res = _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], timeout=30)
        assert res.returncode == 0, res.stderr
        for _ in range(50):
            if site_pid.exists() and site_pid.read_text().strip():
                break
            time.sleep(0.1)
    munged = int(site_pid.read_text())
    # its folders must be reachable by the munge user (pytest's tmp_path is root-only)
    cluster = Path(tempfile.mkdtemp(prefix="augbench-slurm-test-", dir="/tmp"))
    cluster.chmod(0o755)
    env = {**os.environ, "AUGBENCH_SLURM_DIR": str(cluster)}
    env.pop("SLURM_CONF", None)
    try:
        res = _run(["bash", str(SCRIPTS / "start.sh")], timeout=120, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        own = cluster / "etc/slurm.conf"
        assert own.exists() and f"SLURM_CONF={own}" in res.stdout
        # the test cluster answers through its own configuration, and runs a job
        job = _run(["srun", "-p", "gpu", "--gres=gpu:1", "hostname"], timeout=60, env={**env, "SLURM_CONF": str(own)})
        assert job.returncode == 0, job.stderr
        assert site_conf.read_bytes() == conf_before
        assert _alive(munged) and int(site_pid.read_text()) == munged
    finally:
        _run(["bash", str(SCRIPTS / "stop.sh")], timeout=60, env=env)
        assert site_conf.read_bytes() == conf_before, "start/stop changed the site's slurm.conf"
        assert _alive(munged) and int(site_pid.read_text()) == munged, "stop.sh stopped a munged it did not start"
        assert not (cluster / "munge/munged.pid").exists()
        shutil.rmtree(cluster, ignore_errors=True)
        if made_conf:
            site_conf.unlink()
        if started_munged:
            os.kill(munged, 15)


def _test_profile(dest: Path) -> Path:
    """profiles/slurm as shipped, with requests this 2-CPU node can satisfy and fast polling."""
    cfg = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    cfg["default-resources"].update({"mem_mb": "500 * attempt", "runtime": "10 * attempt"})
    for res in cfg["set-resources"].values():
        res.update({"mem_mb": "1000 * attempt", "runtime": "10 * attempt", "cpus_per_gpu": 1})
    cfg.update({"slurm-init-seconds-before-status-checks": 2, "seconds-between-status-checks": 2, "jobs": 4, "latency-wait": 5,
                "group-components": {"per_class_gpu": 2}})  # a group's CPUs add up per chain; this node has 2
    (dest / "profile").mkdir(parents=True)
    (dest / "profile/config.yaml").write_text(yaml.safe_dump(cfg))
    return dest / "profile"


def _workflow(dest: Path, **overrides: object) -> Path:
    dest.mkdir(parents=True)
    for name in ("Snakefile", "workflow", "config", "envs", "src", "models"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, dest / name)
    shutil.copy(REPO / "config.yaml", dest / "config.yaml")
    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    cfg["methods"] = ["real", "retrieval_image", "textual_inversion"]
    cfg["class_block"] = 1  # one personalize and one generate job per class: three of each for the group jobs
    cfg.update(overrides)
    (dest / "run.yaml").write_text(yaml.safe_dump(cfg))
    return dest


def _snakemake(wf: Path, *args: str, limit: int = 900) -> subprocess.CompletedProcess[str]:
    """snakemake under `timeout -k`: the slurm plugin can wait forever on a lost job and ignore SIGTERM."""
    return _run(["timeout", "-k", "20", str(limit), sys.executable, "-m", "snakemake", *args], cwd=wf, env=subprocess_env())


def _slurm_jobs() -> list[dict[str, str]]:
    """Slurm's own records of the jobs it knows (finished ones are kept MinJobAge = 600 s)."""
    out = _run(["scontrol", "show", "job", "-o"], timeout=30).stdout
    jobs = []
    for line in out.splitlines():
        if line.startswith("JobId="):
            jobs.append(dict(re.findall(r"(\w+)=(\S*)", line)))
    return jobs


def _rule_of(job: dict[str, str]) -> str:
    """The plugin puts `rule_<name>_wildcards_...` (or `group_<name>`) in the job's comment."""
    comment = job.get("Comment", "")
    m = re.match(r"rule_(.+?)(_wildcards_.*)?$", comment)
    return m.group(1) if m else comment


def test_tiny_workflow_runs_every_job_through_slurm(slurm: None, tmp_path: Path) -> None:
    wf = _workflow(tmp_path / "slurm", n_aug=[5])  # every rule, each job kind once per method: one n_aug is enough
    profile = _test_profile(tmp_path)
    before = {j["JobId"] for j in _slurm_jobs()}
    planned = scheduled_jobs(_snakemake(wf, "-n", "--configfile", "run.yaml").stdout)
    res = _snakemake(wf, "--profile", str(profile), "--configfile", "run.yaml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ours = [j for j in _slurm_jobs() if j["JobId"] not in before]
    assert ours, "no Slurm job recorded"
    assert all(j["JobState"] == "COMPLETED" for j in ours), {j["JobId"]: j["JobState"] for j in ours}
    rules = {_rule_of(j) for j in ours}
    assert {"world", "download", "pretrain_clip", "pretrain_diffusion", "train", "report"} <= rules, rules
    groups = [j for j in ours if _rule_of(j).startswith("per_class_gpu")]
    assert len(groups) == 2, f"3 classes' personalise -> generate chains in groups of at most 2: {rules}"
    for j in ours:
        rule = _rule_of(j)
        wants_gpu = rule in GPU_RULES or rule.startswith("per_class_gpu")
        tres = j.get("TresPerJob", "") + j.get("TresPerNode", "")
        if wants_gpu:
            assert j["Partition"] == "gpu" and re.search(r"gpu:1$", tres), (rule, j["Partition"], tres)
        else:
            assert j["Partition"] == "cpu" and "gpu" not in tres, (rule, j["Partition"], tres)
    # every planned job ran as a Slurm job: one record per job, the per-class chains inside the group jobs
    submitted: dict[str, int] = {}
    for j in ours:
        submitted[_rule_of(j)] = submitted.get(_rule_of(j), 0) + 1
    ungrouped = {r: n for r, n in planned.items() if r not in ("all", "personalize", "generate")}
    assert {r: submitted.get(r, 0) for r in ungrouped} == ungrouped, (planned, submitted)
    assert planned["personalize"] == planned["generate"] == 3

    # deterministic stages equal a local run's outputs (the local run makes only those)
    local = _workflow(tmp_path / "local", n_aug=[5])
    blocks = [f"results/tiny/generate/textual_inversion/block_{b:04d}" for b in range(3)]
    res_local = _snakemake(local, *blocks, "--cores", "2", "--configfile", "run.yaml")
    assert res_local.returncode == 0, res_local.stderr[-3000:]
    for rel in ("world/classes.json", "world/target/train.parquet", "generate/textual_inversion/block_0000/circle/chunks/00000.tar",
                "generate/textual_inversion/block_0001/square/manifest.parquet",
                "personalize/textual_inversion/block_0000/circle/learned_embeds.safetensors"):
        assert (wf / "results/tiny" / rel).read_bytes() == (local / "results/tiny" / rel).read_bytes(), rel

    # a second run submits nothing
    count = len(_slurm_jobs())
    res = _snakemake(wf, "--profile", str(profile), "--configfile", "run.yaml")
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr, res.stderr[-2000:]
    assert len(_slurm_jobs()) == count, "a complete workflow submitted jobs"


def test_cancelled_job_is_retried_and_leaves_no_partial_output(slurm: None, tmp_path: Path) -> None:
    wf = _workflow(tmp_path / "cancel", methods=["real"], train={"epochs": 1, "batch_size": 16, "min_steps": 400})
    profile = _test_profile(tmp_path)
    target = "results/tiny/train/real/0/0/metrics.json"
    # everything up to the classifier first, so the cancelled job is the one we choose
    res = _snakemake(wf, "results/tiny/world/classes.json", "--profile", str(profile), "--configfile", "run.yaml")
    assert res.returncode == 0, res.stderr[-3000:]
    before = {j["JobId"] for j in _slurm_jobs()}
    proc = subprocess.Popen(["timeout", "-k", "20", "900", sys.executable, "-m", "snakemake", target, "--profile", str(profile),
                             "--configfile", "run.yaml"], cwd=wf, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    cancelled = None
    deadline = time.time() + 300
    while cancelled is None and time.time() < deadline and proc.poll() is None:
        for j in _slurm_jobs():
            if j["JobId"] not in before and _rule_of(j) == "train" and j["JobState"] == "RUNNING":
                time.sleep(3)  # let it get into its training loop
                assert _run(["scancel", j["JobId"]], timeout=30).returncode == 0
                cancelled = j["JobId"]
                break
        time.sleep(1)
    out, _ = proc.communicate(timeout=900)
    assert cancelled is not None, "never saw the train job running: " + out[-3000:]
    assert proc.returncode == 0, out[-5000:]
    states = {j["JobId"]: j["JobState"] for j in _slurm_jobs() if j["JobId"] not in before and _rule_of(j) == "train"}
    assert states[cancelled] == "CANCELLED" and "COMPLETED" in states.values(), states
    metrics = (wf / target).read_text()
    assert '"top1"' in metrics
    leftovers = [p for p in (wf / "results/tiny/train").rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    assert leftovers == [], leftovers
