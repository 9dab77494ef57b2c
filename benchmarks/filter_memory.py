"""Peak memory of the `filter` job (a filtered row's `augbench filter`) at two numbers of classes.

The job reads a row's candidates one class at a time (`augbench.filtering.class_parts`), scores them `BATCH` at a
time and appends the kept rows to the set's parquet, so its peak resident memory should not grow with the number of
classes. This builds a candidates manifest of N classes x 40 noise PNGs (48 x 40 px) in one shard, grouped by class
as collect writes it, a classifier checkpoint in `train`'s format (ResNet-10, 32 px, random), and runs the job in
its own process for N = 20 and 400 (0.8k and 16k candidates), printing its peak RSS beside the candidates' bytes.
The peak is the child's own VmHWM, read as it exits: `ru_maxrss` would not do, as Linux carries the high-water mark
across fork and exec, so a child's figure starts at the size of this process, which built the candidates.

    PYTHONPATH=src python benchmarks/filter_memory.py

It prints figures and asserts nothing.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from augbench.classify import build_model
from augbench.shards import Sample, with_pointers, write_shard
from augbench.specs import FilterSpec, TrainSpec, spec_dict

PER_CLASS = 40
CHILD = """
import sys
from augbench.cli import main
sys.argv = ["augbench", *sys.argv[1:]]
try:
    main()
finally:
    print("VmHWM", [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0], flush=True)
"""


def _candidates(root: Path, n_classes: int) -> tuple[Path, Path, int]:
    """(manifest, classes.json, shard bytes) of n_classes x PER_CLASS noise PNGs."""
    rng = np.random.default_rng(0)
    samples, rows = [], []
    for label in range(n_classes):
        for i in range(PER_CLASS):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
            key = f"c{label:04d}_{i:06d}"
            samples.append(Sample(key=key, image=buf.getvalue(), ext="png", caption="", record={}))
            rows.append({"key": key, "class": f"c{label:04d}", "label": label, "rank": i})
    write_shard(root / "chunk.tar", samples)
    manifest = with_pointers(pd.DataFrame(rows), root / "chunk.tar", root)
    manifest.to_parquet(root / "manifest.parquet", index=False)
    keys = [f"c{c:04d}" for c in range(n_classes)]
    (root / "classes.json").write_text(json.dumps({"classes": keys, "names": {k: k for k in keys}}))
    return root / "manifest.parquet", root / "classes.json", (root / "chunk.tar").stat().st_size


def main() -> None:
    print(f"{'classes':>8} {'candidates':>11} {'shard MB':>9} {'peak RSS MB':>12}")
    spec = TrainSpec(arch="resnet10", input_size=32)
    for n in (20, 400):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            manifest, classes, size = _candidates(root, n)
            torch.manual_seed(0)
            torch.save({"model": build_model(spec, n).state_dict(), "spec": spec_dict(spec), "seed": 0, "n_aug": 0},
                       root / "model.pt")
            res = subprocess.run([sys.executable, "-c", CHILD, "filter", "--candidates", str(manifest), "--classes",
                                  str(classes), "--spec", json.dumps(spec_dict(FilterSpec(score="classifier",
                                                                                          top_fraction=0.5))),
                                  "--n-aug", "20", "--classifier", str(root / "model.pt"), "--out-manifest",
                                  str(root / "out/manifest.parquet"), "--out-stats", str(root / "out/filter.json"),
                                  "--device", "cpu"], capture_output=True, text=True)
            if res.returncode:
                sys.exit(res.stderr[-3000:])
            peak = int(next(ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("VmHWM")))
            kept = json.loads((root / "out/filter.json").read_text())["kept"]
            print(f"{n:>8} {n * PER_CLASS:>11} {size / 1e6:>9.1f} {peak / 1024:>12.0f}   (kept {kept})")


if __name__ == "__main__":
    main()
