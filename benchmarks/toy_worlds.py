"""The toy world beyond its default: retrieval precision and generation fidelity in other worlds the config allows.

Each setting is the demo's config (config.yaml) with another `world` section and a short method list, run by
the workflow itself (`snakemake ... --configfile config.yaml <setting>.yaml`) up to the augmentation sets:
retrieval_image and retrieval_text at the largest n_aug, prompt_classname's generated images, and the judge.
It prints, per setting, retrieval precision (the share of retrieved images whose hidden true kind is the class),
generation fidelity by CLIP and by the judge, the wall time, and the world difference the workflow warned about.

The settings use the models README recommends for toy worlds at 32 px: the shipped models/toy/ (trained once on
the default world's pool; a world of another seed, fewer classes or a smaller pool draws from the same 20 kinds).
`--trained-clip` adds a setting that trains the toy CLIP in the workflow on the small world's own 4k pool instead,
the case the shipped models replace.

    PYTHONPATH=src python benchmarks/toy_worlds.py                 # seed 1; seed 2 with 5 classes, 5 shots, 4k pool
    PYTHONPATH=src python benchmarks/toy_worlds.py --trained-clip  # and the small world with a CLIP trained on it

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from augbench.report import retrieval_precision  # noqa: E402

SMALL = {"seed": 2, "n_classes": 5, "shots": 5, "pool_size": 4000}
SETTINGS: dict[str, dict[str, object]] = {
    "seed1": {"world": {"seed": 1}},
    "small": {"world": SMALL},
}
TRAINED_CLIP = {"world": SMALL, "clip": {"model": "toy"}}
METHODS = ["real", "retrieval_image", "retrieval_text", "prompt_classname"]


def run_setting(name: str, overrides: dict[str, object], work: Path, cores: int) -> dict[str, object]:
    dataset = f"toy_worlds_{name}"
    cfg = {**overrides, "dataset": dataset, "methods": METHODS, "n_aug": ["5x"], "sweep_methods": None, "seeds": [0]}
    cfg_file = work / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    shots = {**base["world"], **overrides["world"]}["shots"]
    n_aug = 5 * shots
    R = f"results/{dataset}"
    targets = [f"{R}/augment/{m}/manifest.parquet" for m in METHODS[1:3]]
    targets += [f"{R}/augment/prompt_classname/fidelity.json", f"{R}/augment/prompt_classname/judge.json"]
    started = time.time()
    res = subprocess.run(["snakemake", *targets, "--profile", "profiles/default", "--cores", str(cores),
                          "--configfile", "config.yaml", str(cfg_file)], cwd=REPO, capture_output=True, text=True)
    wall = time.time() - started
    if res.returncode != 0:
        print(res.stdout[-3000:], res.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"setting {name}: snakemake failed")
    truth = pd.read_parquet(REPO / R / "world/pool/pool.parquet")
    fid = json.loads((REPO / R / "augment/prompt_classname/fidelity.json").read_text())
    judge = json.loads((REPO / R / "augment/prompt_classname/judge.json").read_text())
    warned = re.findall(r"was trained on another world.*", res.stdout + res.stderr)
    return {"setting": name, "world": json.dumps(overrides["world"]), "models": overrides.get("clip", {}).get("model", "shipped"),
            "n_aug": n_aug,
            "retrieval_image": retrieval_precision(REPO / R / "augment/retrieval_image/manifest.parquet", n_aug, truth),
            "retrieval_text": retrieval_precision(REPO / R / "augment/retrieval_text/manifest.parquet", n_aug, truth),
            "fidelity_clip": fid["generation_fidelity"], "fidelity_judge": judge["judge_fidelity"],
            "judge_test_top1": judge["judge_test_top1"], "wall_s": round(wall), "warning": len(warned) > 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/augbench-toy-worlds", help="where the settings' config files go")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--trained-clip", action="store_true", help="also the small world with a CLIP trained on its own pool")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    settings = dict(SETTINGS, **({"small_trained_clip": TRAINED_CLIP} if a.trained_clip else {}))
    rows = []
    for name, overrides in settings.items():
        rows.append(run_setting(name, overrides, work, a.cores))
        print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        print(table.drop(columns=["world"]).to_string(index=False))


if __name__ == "__main__":
    main()
