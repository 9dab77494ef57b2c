"""Where a finished run's time went: its wall time, the CPU-seconds summed over its jobs, a table per rule, and the
critical path (the chain of dependent jobs whose wall times add up to the most: what more cores cannot shorten).

    python scripts/demo_time.py                                   # the demo (config.yaml), after `make demo`
    python scripts/demo_time.py --configfile config/tiny.yaml

Jobs and their dependencies come from Snakemake's own dry run over the whole DAG (`-n --forceall`: input, output
and benchmark file of every job); each job's wall and CPU seconds from its benchmark record and the closing line of
its log (`augbench ... done in Xs (cpu Ys)`, the command's own CPU, children included). The run's wall time is the
span of the newest Snakemake log of a run that finished. It prints figures and changes nothing.
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

DONE = re.compile(r"done in ([\d.]+)s \(cpu ([\d.]+)s\)")
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]", re.M)


def jobs_of(configfile: str) -> list[dict]:
    """Every job of the DAG with its rule, inputs, outputs, benchmark and log, from Snakemake's dry run."""
    text = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "--configfile", configfile],
                          capture_output=True, text=True).stdout
    jobs, cur = [], None
    for line in text.splitlines():
        m = re.match(r"^(local)?rule (\w+):$", line)
        if m:
            cur = {"rule": m.group(2), "input": [], "output": [], "benchmark": None, "log": None}
            jobs.append(cur)
            continue
        m = re.match(r"^    (input|output|benchmark|log): (.*)$", line)
        if cur is not None and m:
            key, val = m.groups()
            vals = [v.strip() for v in val.split(", ")]
            if key in ("input", "output"):
                cur[key] = vals
            else:
                cur[key] = vals[0]
    return jobs


def seconds(job: dict) -> tuple[float, float]:
    """(wall, cpu) seconds of one job: the command's own closing log line, else its benchmark record."""
    if job["log"] and Path(job["log"]).exists():
        m = DONE.findall(Path(job["log"]).read_text(errors="replace"))
        if m:
            return float(m[-1][0]), float(m[-1][1])
    if job["benchmark"] and Path(job["benchmark"]).exists():
        row = next(csv.DictReader(open(job["benchmark"]), delimiter="\t"))
        return float(row["s"]), float(row.get("cpu_time") or 0)
    return 0.0, 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", default="config.yaml")
    a = ap.parse_args()
    jobs = jobs_of(a.configfile)
    producer = {o: i for i, j in enumerate(jobs) for o in j["output"]}
    times = [seconds(j) for j in jobs]
    per_rule: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for j, (w, c) in zip(jobs, times, strict=True):
        r = per_rule[j["rule"]]
        r[0] += 1
        r[1] += w
        r[2] += c
    total_cpu = sum(c for _, c in times)
    print(f"{'rule':24s} {'jobs':>5s} {'wall s':>9s} {'CPU s':>9s} {'share':>6s}")
    for rule, (n, w, c) in sorted(per_rule.items(), key=lambda kv: -kv[1][2]):
        if n and (w or c):
            print(f"{rule:24s} {n:5d} {w:9.0f} {c:9.0f} {100 * c / total_cpu:5.1f}%")
    print(f"{'all jobs':24s} {len(jobs):5d} {sum(w for w, _ in times):9.0f} {total_cpu:9.0f}")
    # the critical path: longest chain through the DAG by wall seconds
    best: dict[int, tuple[float, int | None]] = {}

    def longest(i: int) -> tuple[float, int | None]:
        if i not in best:
            deps = {producer[f] for f in jobs[i]["input"] if f in producer}
            prev = max(((longest(d)[0], d) for d in deps), default=(0.0, None))
            best[i] = (prev[0] + times[i][0], prev[1])
        return best[i]

    sys.setrecursionlimit(10000)
    end = max(range(len(jobs)), key=lambda i: longest(i)[0])
    chain, i = [], end
    while i is not None:
        chain.append(i)
        i = best[i][1]
    print(f"\ncritical path: {longest(end)[0]:.0f} s of job wall time")
    for i in reversed(chain):
        if times[i][0]:
            print(f"  {times[i][0]:7.0f} s  {jobs[i]['rule']}  {jobs[i]['output'][0] if jobs[i]['output'] else ''}")
    logs = [p for p in sorted(Path(".snakemake/log").glob("*.snakemake.log"), key=lambda p: p.stat().st_mtime)
            if "steps (100%) done" in p.read_text(errors="replace")]  # the newest run that finished its jobs
    if logs:
        stamps = STAMP.findall(logs[-1].read_text())
        if stamps:
            from datetime import datetime

            t = [datetime.strptime(re.sub(" +", " ", s), "%a %b %d %H:%M:%S %Y") for s in (stamps[0], stamps[-1])]
            print(f"\nworkflow wall time (newest Snakemake log, {logs[-1].name}): {(t[1] - t[0]).total_seconds():.0f} s")


if __name__ == "__main__":
    main()
