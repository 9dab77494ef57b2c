"""Train a torchvision ResNet on real + augmentation images and evaluate top-1 on the test split.

Real and augmentation images are mixed by concatenation. The run's seed drives initialisation,
batch order and augmentation, so (method, n_aug, seed) fully determines the result on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from torch import nn

from augbench.device import pick_device
from augbench.imaging import decode_many, shift_flip, to_float
from augbench.io import atomic_path, write_json, write_meta
from augbench.shards import iter_shard
from augbench.specs import TrainSpec, item_seed, spec_dict

log = logging.getLogger(__name__)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def build_model(spec: TrainSpec, n_classes: int) -> nn.Module:
    """A torchvision ResNet from scratch; `small_input_stem` swaps the 7x7/2 stem and max-pool for a 3x3/1 conv."""
    try:
        ctor = getattr(torchvision.models, spec.arch)
    except AttributeError as exc:
        raise ValueError(f"train: unknown torchvision architecture {spec.arch!r}") from exc
    model = ctor(weights=None, num_classes=n_classes)
    if spec.small_input_stem:
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def load_split(table: Path, root: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode a split table (path relative to `root`, label) to (NHWC uint8, labels)."""
    df = pd.read_parquet(table)
    arr, tags = decode_many(((i, str(root / p)) for i, p in enumerate(df["path"])), size, str(table))
    return arr, df["label"].to_numpy()[np.asarray(tags, dtype=np.int64)]


def load_augment(manifest: Path, shard: Path, n_aug: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n_aug` images per class (by rank) of an augmentation set (manifest + tar shard)."""
    df = pd.read_parquet(manifest)
    df = df[df["rank"] < n_aug]
    wanted = dict(zip(df["key"].astype(str), df["label"], strict=True))
    items = ((s.key, s.image) for s in iter_shard(shard) if s.key in wanted)
    arr, tags = decode_many(items, size, str(shard))
    found = len(tags)
    if found < len(wanted):
        log.warning("train: %s: %d of %d augmentation images missing from %s", manifest, len(wanted) - found, len(wanted), shard)
    return arr, np.asarray([wanted[t] for t in tags], dtype=np.int64)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, n_classes: int, device: torch.device) -> dict[str, object]:
    """Top-1, top-5 and per-class accuracy."""
    model.eval()
    logits = []
    for i in range(0, len(x), 256):
        xb = (to_float(torch.from_numpy(x[i:i + 256])) - MEAN) / STD
        logits.append(model(xb.to(device)).float().cpu())
    out = torch.cat(logits)
    yt = torch.from_numpy(y)
    top5 = out.topk(min(5, n_classes), dim=1).indices
    correct = top5[:, 0] == yt
    per_class = {int(c): float(correct[yt == c].float().mean()) for c in range(n_classes) if (yt == c).any()}
    return {"top1": float(correct.float().mean()), "top5": float((top5 == yt[:, None]).any(1).float().mean()),
            "per_class_top1": per_class, "n_test": len(y)}


def train(real: list[Path], root: Path, test: Path, augment: list[tuple[Path, Path]], n_aug: int, seed: int,
          n_classes: int, out_metrics: Path, out_ckpt: Path, spec: TrainSpec) -> dict[str, object]:
    """Train from scratch on real (+ augmentation) images and write metrics and the final checkpoint."""
    started = time.time()
    torch.set_num_threads(spec.threads)
    torch.manual_seed(item_seed(seed, "train", "init"))
    device = pick_device()
    parts = [load_split(t, root, spec.input_size) for t in real]
    n_real = sum(len(p[1]) for p in parts)
    parts += [load_augment(m, s, n_aug, spec.input_size) for m, s in augment]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    x_test, y_test = load_split(test, root, spec.input_size)
    log.info("train: %d real + %d augmentation images, %d test, device %s, spec %s", n_real, len(y) - n_real, len(y_test), device, spec)
    model = build_model(spec, n_classes).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=spec.lr, momentum=spec.momentum, nesterov=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing)
    bs = min(spec.batch_size, len(y))
    steps_per_epoch = max(len(y) // bs, 1)
    total = max(spec.epochs * steps_per_epoch, spec.min_steps)
    warmup = min(spec.warmup_epochs * steps_per_epoch, total // 5)
    g = torch.Generator().manual_seed(item_seed(seed, "train", "data"))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    perm, cursor, loss_ema = torch.randperm(len(y), generator=g), 0, None
    for step in range(total):
        if cursor + bs > len(y):
            perm, cursor = torch.randperm(len(y), generator=g), 0
        idx = perm[cursor:cursor + bs]
        cursor += bs
        if step < warmup:
            lr = spec.lr * (step + 1) / warmup
        else:
            lr = spec.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        for group in opt.param_groups:
            group["lr"] = lr
        xb = ((shift_flip(xt[idx], g) - MEAN) / STD).to(device)
        loss = loss_fn(model(xb), yt[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if step % 100 == 0 or step == total - 1:
            log.info("train: step %d/%d loss %.4f lr %.3f (%.0fs)", step, total, loss_ema, lr, time.time() - started)
    metrics = evaluate(model, x_test, y_test, n_classes, device)
    metrics.update({"n_real": n_real, "n_aug_images": int(len(y) - n_real), "n_aug_per_class": n_aug, "seed": seed,
                    "steps": total, "final_loss": loss_ema, "train_seconds": round(time.time() - started, 1)})
    with atomic_path(out_ckpt) as tmp:
        torch.save({"model": model.state_dict(), "spec": spec_dict(spec), "seed": seed, "n_aug": n_aug}, tmp)
    write_json(out_metrics, metrics)
    write_meta(out_metrics, "train", spec_dict(spec), started, seed=seed, n_aug=n_aug,
               inputs={"real": [str(p) for p in real], "augment": [[str(a), str(b)] for a, b in augment]})
    log.info("train: top1 %.4f top5 %.4f in %.0fs", metrics["top1"], metrics["top5"], time.time() - started)
    return metrics


def read_metrics(path: Path) -> dict[str, object]:
    """Load a metrics.json, naming the file on error."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read metrics: {exc}") from exc
