"""Memory that does not grow with the data: collect streams a 20k-image generated set by pointer."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import REPO, subprocess_env
from PIL import Image

from augbench.shards import Sample, pointed_images, with_pointers, write_shard

PEAK = """import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"""


def _peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident set of one command (its own process: the wrapper's only child), in MB."""
    res = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True, env=subprocess_env(), timeout=900)
    rc, kb = res.stdout.split()[-2:]
    assert rc == "0", res.stderr[-3000:]
    return int(kb) / 1024


def _generated_set(root: Path, classes: list[str], per_class: int, chunk: int = 250) -> list[Path]:
    """Per-class folders as a generate block writes them: chunks/<c>.tar and a manifest with pointers."""
    rng = np.random.default_rng(0)
    manifests = []
    for label, key in enumerate(classes):
        out = root / key
        parts = []
        for c in range(0, per_class, chunk):
            samples, rows = [], []
            for j in range(c, min(c + chunk, per_class)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
                samples.append(Sample(f"{key}_{j:06d}", buf.getvalue(), "png", "", {}))
                rows.append({"key": f"{key}_{j:06d}", "class": key, "label": label, "rank": j, "index": j})
            tar = out / "chunks" / f"{c // chunk:05d}.tar"
            write_shard(tar, samples)
            parts.append(with_pointers(pd.DataFrame(rows), tar, out))
        pd.concat(parts, ignore_index=True).to_parquet(out / "manifest.parquet")
        manifests.append(out / "manifest.parquet")
    return manifests


def test_collect_streams_20k_generated_images_under_1_gb(tmp_path: Path) -> None:
    classes = [f"c{i}" for i in range(10)]
    (tmp_path / "classes.json").write_text(json.dumps({"classes": classes, "names": {k: k for k in classes}}))
    manifests = _generated_set(tmp_path / "block", classes, per_class=2000)
    out = tmp_path / "augment"
    cmd = [sys.executable, "-m", "augbench", "collect", "--manifests", *map(str, manifests), "--classes",
           str(tmp_path / "classes.json"), "--clip", str(REPO / "models/toy/clip"), "--out-manifest",
           str(out / "manifest.parquet"), "--out-fidelity", str(out / "fidelity.json"), "--device", "cpu"]
    peak = _peak_rss_mb(cmd)
    print(f"\ncollect over 20,000 images: peak RSS {peak:.0f} MB")
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert fidelity["images"] == 20_000 and 0 <= fidelity["generation_fidelity"] <= 1
    assert peak < 1024, f"collect held {peak:.0f} MB"
    assert not list(out.glob("*.tar")), "the augmentation set is pointers, not a second copy"
    # the set's pointers (rebased to its own folder) read back the very bytes the chunks hold
    joined = pointed_images(out / "manifest.parquet")
    first = pointed_images(manifests[3])
    assert len(joined) == 20_000 and all(joined[k] == v for k, v in first.items())
