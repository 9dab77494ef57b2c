"""Peak memory of the shared-adapter personalisation job at two numbers of classes: flat, or does it hold the set?

`shared_adapter` trains one LoRA and a pseudo-word per class in one job over every class. Its latents are appended to
one file, a class at a time, and read memory-mapped, so the job's peak resident memory should not grow with the
classes. This runs the job's own function (`augbench.personalize.personalize_block`) in a process of its own, on a tiny
randomly initialised Stable Diffusion pipeline (tests/architectures.py) at 64 px, with N classes of 40 noise images,
for N = 25 and 250 (the latents: 80 rows of 16 KB per class), and prints each process's peak RSS (VmHWM) beside the
bytes of latents it encoded. A job that held every class's latents would grow by the latent file's difference.

    PYTHONPATH=src python benchmarks/shared_adapter_memory.py

It prints figures and asserts nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
from pathlib import Path
from augbench.personalize import personalize_block
from augbench.specs import PersonalizeSpec
model, table, root, out, n = sys.argv[1:6]
classes = [(f"c{i}", i, f"w{i}") for i in range(int(n))]
spec = PersonalizeSpec(method="shared_adapter", shared_steps=20, batch_size=4, resolution=64, lora_rank=2)
personalize_block(model, Path(table), Path(root), classes, Path(out) / "block", Path(out) / "cache", spec)
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"hwm_mb": hwm / 1024}))
"""


def photos(root: Path, n_classes: int, per_class: int = 40, side: int = 64) -> Path:
    """A training table of `n_classes` x `per_class` noise PNGs."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for c in range(n_classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = f"c{c}/{i}.png"
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / path)
            rows.append({"path": path, "label": c, "class": f"c{c}"})
    table = root / "train.parquet"
    pd.DataFrame(rows).to_parquet(table)
    return table


def main() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from architectures import WORDS, build  # noqa: F401 (the tiny pipeline builders of the test suite)

    work = Path(tempfile.mkdtemp(prefix="augbench-shared-"))
    model = build("sd", work / "model")
    print("shared_adapter personalize job, tiny SD at 64 px, 40 images per class, 20 steps of batch 4")
    print(f"{'classes':>8} {'latents MB':>11} {'peak RSS MB':>12}")
    for n in (25, 250):
        root = work / f"photos_{n}"
        table = photos(root, n)
        out = work / f"out_{n}"
        res = subprocess.run([sys.executable, "-c", CHILD, str(model), str(table), str(root), str(out), str(n)],
                             capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin",
                                                                  "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
        if res.returncode:
            print(f"{n:>8} failed: {res.stderr.strip().splitlines()[-3:]}")
            continue
        hwm = json.loads(res.stdout.strip().splitlines()[-1])["hwm_mb"]
        latents = n * 80 * 4 * 32 * 32 * 4 / 2**20  # rows x floats x 4 bytes (the file is removed when the run ends)
        print(f"{n:>8} {latents:>11.1f} {hwm:>12.1f}")


if __name__ == "__main__":
    main()
