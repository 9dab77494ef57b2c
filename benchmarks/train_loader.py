"""The classifier's decode-cache loader against torchvision's reference loader: same files, same geometry, same model.

A folder tree of JPEG images (ImageFolder layout, `--side` px, like resized ImageNet) is read two ways, to the same
geometry (Resize(load) + CenterCrop(load), then RandomResizedCrop(input) + horizontal flip + normalisation):
  * reference: `torchvision.datasets.ImageFolder` + `DataLoader` (`--workers` processes) with those transforms on PIL
    images, so every step decodes its JPEGs;
  * augbench: the workflow's `augbench decode` job (Resize + CenterCrop to load into a uint8 file), then
    `augbench.classify`'s path: a memory map, batches gathered by the prefetch thread, the batched RandomResizedCrop +
    flip (`augment_batch`) and normalisation.
Decoding is counted in both arms: each augbench repeat runs the decode job afresh and its time is added to the steps'
(the reference pays for decoding inside its steps). Each arm trains the same model (`--arch`, SGD) for `--steps` steps
of `--batch` (at least 200), then the loaders alone (no model); repeats are interleaved (reference, augbench,
reference, ...) and the median and spread (min-max) of images/s are printed, with the ratio of medians.

    PYTHONPATH=src python benchmarks/train_loader.py                                  # resnet18 at 64 px, CPU
    PYTHONPATH=src python benchmarks/train_loader.py --arch resnet50 --input 224 --load 256 --side 320 --device cuda

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from augbench.classify import MEAN, STD, augment_batch, build_model, prefetch  # noqa: E402
from augbench.decoded import Rows, decode_split, open_decoded  # noqa: E402
from augbench.specs import TrainSpec  # noqa: E402


def make_tree(root: Path, n_classes: int, per_class: int, side: int) -> None:
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        folder = root / f"c{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):  # smooth random images: JPEG sizes like photos', not like noise
            small = rng.integers(0, 256, (side // 8, side // 8 + 3, 3), dtype=np.uint8)
            Image.fromarray(small).resize((side + 24, side), Image.Resampling.BICUBIC).save(folder / f"{i}.jpg", quality=90)


def step_fn(model, opt, device):
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        loss = loss_fn(model(xb), yb.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def reference(root: Path, spec: TrainSpec, steps: int, workers: int, device: torch.device, model=None) -> float:
    from torchvision import datasets, transforms

    bicubic = transforms.InterpolationMode.BICUBIC  # the decode job: shorter side to load (bicubic), central square
    tf = transforms.Compose([transforms.Resize(spec.load_size, bicubic), transforms.CenterCrop(spec.load_size),
                             transforms.RandomResizedCrop(spec.input_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist())])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), tf), batch_size=spec.batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    step = step_fn(model, torch.optim.SGD(model.parameters(), lr=0.01), device) if model is not None else None
    done, started = 0, None
    while done < steps + 2:
        for xb, yb in loader:
            if done == 2:  # two warm-up steps (worker start, first allocations)
                started = time.perf_counter()
            if step is not None:
                step(xb.to(device, non_blocking=True), yb)
            done += 1
            if done >= steps + 2:
                break
    return steps * spec.batch_size / (time.perf_counter() - started)


def ours(table: Path, decoded: Path, spec: TrainSpec, steps: int, device: torch.device, model=None) -> float:
    """Images/s over the decode job plus `steps` steps (the two warm-up steps excluded, as in the reference)."""
    shutil.rmtree(decoded, ignore_errors=True)
    t0 = time.perf_counter()
    decode_split(table, Path("/"), spec.load_size, decoded)
    decode_s = time.perf_counter() - t0
    images, rows, labels, _ = open_decoded(decoded)
    data = Rows([(images, rows)])
    mean, std = MEAN.to(device), STD.to(device)
    step = step_fn(model, torch.optim.SGD(model.parameters(), lr=0.01), device) if model is not None else None
    started = None
    for s, (xb, yb, _) in zip(range(steps + 2), prefetch(data, labels, 0, 0, steps + 2, spec.batch_size, pin=device.type == "cuda"),
                           strict=True):
        if s == 2:
            started = time.perf_counter()
        x = (augment_batch(xb.to(device, non_blocking=True), spec, 0, s) - mean) / std
        if step is not None:
            step(x, yb)
    return steps * spec.batch_size / (time.perf_counter() - started + decode_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/augbench-train-loader")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--input", type=int, default=64)
    ap.add_argument("--load", type=int, default=80)
    ap.add_argument("--side", type=int, default=112, help="side of the JPEG images on disk")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=(os.cpu_count() or 2) - 1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    work, device = Path(a.work), torch.device(a.device)
    if not (work / "tree").exists():
        make_tree(work / "tree", a.classes, a.per_class, a.side)
    import pandas as pd

    files = sorted((work / "tree").rglob("*.jpg"))
    table = work / "train.parquet"
    pd.DataFrame({"path": [str(f) for f in files], "label": [int(f.parent.name[1:]) for f in files]}).to_parquet(table)
    spec = TrainSpec(arch=a.arch, input_size=a.input, load_size=a.load, augment="rrc", batch_size=a.batch)
    print(f"{len(files)} JPEGs of {a.side} px -> Resize + CenterCrop {a.load} -> RandomResizedCrop {a.input} + flip, both arms; "
          f"decoding counted in both")
    print(f"{a.arch}, batch {a.batch}, {a.steps} timed steps ({a.steps * a.batch / len(files):.1f} epochs), device {device}, "
          f"reference workers {a.workers}, {a.repeats} interleaved repeats")
    for with_model in (True, False):
        ref, got = [], []
        for _ in range(a.repeats):  # A B A B ...: drift in the machine's speed falls on both arms
            torch.manual_seed(0)
            model_a = build_model(spec, a.classes).to(device) if with_model else None
            ref.append(reference(work / "tree", spec, a.steps, a.workers, device, model_a))
            torch.manual_seed(0)
            model_b = build_model(spec, a.classes).to(device) if with_model else None
            got.append(ours(table, work / "decoded", spec, a.steps, device, model_b))
        what = "training" if with_model else "loader alone"
        r, g = float(np.median(ref)), float(np.median(got))
        print(f"  {what:13s} reference {r:8.1f} images/s ({min(ref):.1f}-{max(ref):.1f})   augbench {g:8.1f} images/s "
              f"({min(got):.1f}-{max(got):.1f})   ratio of medians {g / r:.2f}x")

if __name__ == "__main__":
    main()
