"""The demo's training floor: what its classifier runs cost on this machine at the least, whatever the loader or the
process layout, measured against the CPU-second budget issue 23 sets for the whole demo (1,200 CPU-s).

It reads the demo's own config (config.yaml: rows, seeds, n_aug, sweep_methods, the train recipe and the judge's
steps), counts its training runs and their steps as the workflow schedules them, and times one optimiser step of the
recipe's model (forward, backward, SGD with momentum) on random batches, one thread (the demo runs one job per core):
  * the recipe's batch, one model: what every run pays per step;
  * three models' batches at once (seeds batched into one process and one call, the issue's suggestion): a batch of
    3 x batch through one model of the same size, an upper bound on what sharing the call could save (three separate
    weights cannot be cheaper than one);
  * the process's start (python, torch, torchvision and augbench imported), which a run per seed pays once each.
Steps are repeated (`--steps`, after warm-up) in interleaved order (A B A B ...); the median and spread are printed.

    PYTHONPATH=src python benchmarks/demo_train_floor.py

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def demo_runs(config: dict) -> tuple[int, list[int]]:
    """(training runs, steps of each) of the demo as the workflow schedules them: per row, its n_aug values (baselines 0;
    rows outside sweep_methods at the largest only) and seeds; steps = max(min_steps, epochs x images / batch)."""
    shots, n_classes = config["world"]["shots"], config["world"]["n_classes"]
    n_aug = sorted({round(float(v[:-1]) * shots) if isinstance(v, str) else int(v) for v in config["n_aug"]})
    t = config["train"]
    steps = []
    for m in config["methods"]:
        if m in ("real", "real_x2"):
            values, real = [0], shots * (2 if m == "real_x2" else 1)
        else:
            values, real = (n_aug if m in (config.get("sweep_methods") or config["methods"]) else [max(n_aug)]), shots
        for n in values:
            images = n_classes * (real + n)
            steps += [max(t["min_steps"], math.ceil(t["epochs"] * images / t["batch_size"]))] * len(config["seeds"])
    return len(steps), steps


def step_seconds(arch: str, size: int, batch: int, n_classes: int) -> callable:
    """One SGD step of the recipe's model on a random batch (forward, backward, update): a function that times one."""
    from augbench.classify import build_model
    from augbench.specs import TrainSpec

    model = build_model(TrainSpec(arch=arch, input_size=size), n_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, n_classes, (batch,))

    def once() -> float:
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - started

    for _ in range(5):
        once()
    return once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "config.yaml"))
    ap.add_argument("--steps", type=int, default=60, help="timed steps per arm")
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = yaml.safe_load(Path(a.config).read_text())
    t = cfg["train"]
    runs, steps = demo_runs(cfg)
    judge_steps = cfg["report"]["judge_min_steps"] if cfg["report"]["judge"] else 0
    n_classes = cfg["world"]["n_classes"]
    one = step_seconds(t["arch"], t["input_size"], t["batch_size"], n_classes)
    three = step_seconds(t["arch"], t["input_size"], 3 * t["batch_size"], n_classes)
    a_times, b_times = [], []
    for _ in range(a.steps):  # interleaved
        a_times.append(one())
        b_times.append(three())
    starts = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, torchvision, augbench.classify"], check=True)
        starts.append(time.perf_counter() - started)
    s1, s3, start = float(np.median(a_times)), float(np.median(b_times)), float(np.median(starts))
    print(f"recipe: {t['arch']} at {t['input_size']} px, batch {t['batch_size']}, 1 thread")
    print(f"one step, batch {t['batch_size']}: median {s1 * 1e3:.1f} ms (min {min(a_times) * 1e3:.1f}, max {max(a_times) * 1e3:.1f})")
    print(f"one step, batch {3 * t['batch_size']} (three seeds' batches, one model): median {s3 * 1e3:.1f} ms "
          f"(min {min(b_times) * 1e3:.1f}, max {max(b_times) * 1e3:.1f}); per seed {s3 / 3 * 1e3:.1f} ms = {s3 / 3 / s1:.2f} x one")
    print(f"process start (python, torch, torchvision, augbench.classify): median {start:.1f} s")
    total = sum(steps)
    print(f"demo: {runs} training runs, {total} steps in all; the judge {judge_steps} steps")
    floor = (total + judge_steps) * s1
    batched = (total + judge_steps) * s3 / 3
    print(f"training floor, steps alone: {floor:.0f} CPU-s a run per seed; {batched:.0f} CPU-s with seeds batched "
          f"(lower bound); plus {runs * start:.0f} CPU-s of process starts a run per seed")
    print(f"the whole demo's budget (issue 23): 1,200 CPU-s; the training steps alone, batched: {batched / 1200:.1f} x it")


if __name__ == "__main__":
    main()
