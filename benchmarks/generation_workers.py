"""Class-block workers against one process per class: the workflow's own `augbench generate` command, one method over
20 classes, on the CPU with a tiny Stable-Diffusion-architecture pipeline (the shipped toy model, models/toy/diffusion:
AutoencoderKL + UNet2DConditionModel + CLIPTextModel loaded with StableDiffusionPipeline.from_pretrained).

Both arms make the same images (same seeds; the block test checks the bytes are equal): one process with
`--keys` of all 20 classes, and 20 processes with one class each, run one after the other, one thread each. It prints
images/s of each arm, their ratio and total wall times, and the block worker's pipeline loads.

    PYTHONPATH=src python benchmarks/generation_workers.py                 # 20 classes x 8 images
    PYTHONPATH=src python benchmarks/generation_workers.py --images 25     # more work per class: a smaller ratio

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ...: failed\n{res.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/augbench-generation-workers")
    ap.add_argument("--model", default=str(REPO / "models/toy/diffusion"))
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--images", type=int, default=8, help="images per class")
    ap.add_argument("--steps", type=int, default=12, help="DPM-Solver steps")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    keys = [f"class{i:02d}" for i in range(a.classes)]
    (work / "classes.json").write_text(json.dumps({"classes": keys, "names": {k: f"shape {i}" for i, k in enumerate(keys)}}))
    (work / "train.parquet").write_bytes(b"")  # prompt_classname reads no real image
    spec = json.dumps({"method": "prompt_classname", "n_images": a.images, "batch_size": a.images, "steps": a.steps,
                       "guidance_scale": 5.0})
    base = [sys.executable, "-m", "augbench", "generate", "--model", a.model, "--table", str(work / "train.parquet"),
            "--root", str(work), "--classes", str(work / "classes.json"), "--spec", spec, "--threads", "1", "--device", "cpu"]
    block = run([*base, "--keys", *keys, "--out", str(work / "block/out"), "--cache", str(work / "block/cache")])
    meta = json.loads((work / "block/out.meta.json").read_text())["stats"]
    per_class = sum(run([*base, "--keys", k, "--out", str(work / f"single/{k}"), "--cache", str(work / "single/cache")])
                    for k in keys)
    n = a.classes * a.images
    print(f"one method, {a.classes} classes x {a.images} images ({a.steps} DPM-Solver steps, guidance 5, CPU, 1 thread):")
    print(f"  block worker (1 process, {meta['pipeline_loads']} pipeline load): {block:7.1f} s  {n / block:6.2f} images/s")
    print(f"  one process per class ({a.classes} processes):           {per_class:7.1f} s  {n / per_class:6.2f} images/s")
    print(f"  ratio (block / per class, images/s): {per_class / block:.2f}x")


if __name__ == "__main__":
    main()
