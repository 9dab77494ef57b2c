"""Train a torchvision ResNet on real + augmentation images and evaluate top-1 on the test split.

Real and augmentation images are mixed by concatenation. The run's seed drives initialisation,
batch order and augmentation, so (method, n_aug, seed) fully determines the result on CPU.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from torch import nn

from augbench.decoded import Rows, is_decoded, open_decoded
from augbench.device import pick_device
from augbench.imaging import center_crop, colour_invariance, decode_many, random_resized_crop, shift_flip, to_float
from augbench.io import content_id, save_torch, write_json, write_meta
from augbench.shards import read_pointed
from augbench.specs import TrainSpec, canonical_json, item_seed, parse_spec, spec_dict

log = logging.getLogger(__name__)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def build_model(spec: TrainSpec, n_classes: int) -> nn.Module:
    """A torchvision model from scratch (any `torchvision.models` name, or `resnet10`); `small_input_stem` swaps a ResNet's
    7x7/2 stem and max-pool for a 3x3/1 conv."""
    if spec.arch == "resnet10":  # torchvision's ResNet with one BasicBlock per stage: half ResNet-18's CPU cost
        from torchvision.models.resnet import BasicBlock, ResNet

        model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=n_classes)
    else:
        try:
            ctor = getattr(torchvision.models, spec.arch)
        except AttributeError as exc:
            raise ValueError(f"train: unknown torchvision architecture {spec.arch!r}") from exc
        model = ctor(weights=None, num_classes=n_classes)
    if spec.small_input_stem:
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def load_split(table: Path, root: Path, size: int, skips: Counter[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode a split table (path relative to `root`, label) to (NHWC uint8, labels); undecodable images counted into `skips`."""
    df = pd.read_parquet(table)
    arr, tags = decode_many(((i, str(root / p)) for i, p in enumerate(df["path"])), size, str(table), skips, fit="crop")
    return arr, df["label"].to_numpy()[np.asarray(tags, dtype=np.int64)]


def load_augment(manifest: Path, n_aug: int, size: int, skips: Counter[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `n_aug` images per class (by rank) of an augmentation set, read by its manifest's pointers."""
    df = pd.read_parquet(manifest)
    df = df[df["rank"] < n_aug].reset_index(drop=True)
    labels = df["label"].to_numpy()
    missing: Counter[str] = Counter()
    arr, tags = decode_many(read_pointed(df, Path(manifest).parent), size, str(manifest), missing, fit="crop")
    if skips is not None:
        skips.update(missing)
    return arr, labels[np.asarray(tags, dtype=np.int64)].astype(np.int64)


def _source(path: Path, root: Path, size: int, n_aug: int | None, skips: Counter[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, rows to use, their labels) of one input: a decoded folder (memory-mapped; the workflow's path), an
    augmentation manifest with pointers, or a split table (both decoded here, in memory: direct use and tests).
    `n_aug` (augmentation sets) keeps the first n_aug images per class."""
    path = Path(path)
    if is_decoded(path):
        images, rows, labels, stats = open_decoded(path, n_aug)
        if images.shape[1:3] != (size, size):  # decoded for another train.load_size: stale, not to be cropped silently
            raise ValueError(f"{path}: decoded at {images.shape[1]}x{images.shape[2]} px, but this run loads {size} px "
                             f"(train.load_size): decode it again (augbench decode, or the rules decode_split / decode_augment)")
        if stats["skipped"]:
            skips.update(stats["skipped_by_reason"] if n_aug is None else {"undecodable": stats["skipped"]})
        return images, rows, labels
    if n_aug is not None:
        arr, labels = load_augment(path, n_aug, size, skips)
    else:
        arr, labels = load_split(path, root, size, skips)
    return arr, np.arange(len(arr)), labels


def rss_anon_mb() -> float:
    """The process's anonymous resident memory (Linux RssAnon: not file-backed, so memory-mapped data is not in it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prefetch(data: Rows, y: np.ndarray, seed: int, start: int, total: int, bs: int, pin: bool,
             order: tuple[int, int | None] = (1, None), indices=None):  # -> Iterator
    """The batches (images, labels, row indices) of steps start..total-1, gathered by a background thread two steps
    ahead (into pinned memory for a GPU). Batch contents are a function of (seed, step) and the `order` geometry (rows
    per block, per buffer: `shuffle_geometry`), or of `indices(step)` where given, so the order of work changes
    nothing; the rows come along so that the loop never derives them a second time."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def work() -> None:
        try:
            for step in range(start, total):
                if stop.is_set():
                    return
                idx = (batch_indices(seed, step, len(y), bs, *order) if indices is None else indices(step)).numpy()
                xb, yb = torch.from_numpy(data.take(idx)), torch.from_numpy(y[idx])
                q.put((xb.pin_memory(), yb.pin_memory(), idx) if pin else (xb, yb, idx))
        except BaseException as exc:  # handed to the training loop, which raises it
            q.put(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        for _ in range(start, total):
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def pointed_shards(manifests: list[Path]) -> list[Path]:
    """The shard files the manifests' pointers lead to (their content is part of a run's identity)."""
    found: set[Path] = set()
    for m in manifests:
        found |= {Path(m).parent / s for s in pd.read_parquet(m, columns=["shard"])["shard"].unique()}
    return sorted(found)


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, device: torch.device, spec: TrainSpec | None = None) -> torch.Tensor:
    """The model's logits (float32, CPU) for decoded uint8 images, 256 at a time, as evaluation sees them (centre crop
    of `input_size` when images are loaded larger)."""
    model.eval()
    logits = []
    mean, std = MEAN.to(device), STD.to(device)
    for i in range(0, len(x), 256):
        xb = to_float(torch.from_numpy(np.asarray(x[i:i + 256])).to(device))
        if spec is not None and xb.shape[-1] != spec.input_size:
            xb = center_crop(xb, spec.input_size)
        xb = (xb - mean) / std
        if spec is not None and spec.channels_last and device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(device, spec):
            logits.append(model(xb).float().cpu())
    return torch.cat(logits) if logits else torch.zeros((0, 0))


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, n_classes: int, device: torch.device,
             spec: TrainSpec | None = None) -> dict[str, object]:
    """Top-1, top-5 and per-class accuracy (centre crop of `input_size` when images are loaded larger)."""
    out = predict_logits(model, x, device, spec)
    yt = torch.from_numpy(y)
    top5 = out.topk(min(5, n_classes), dim=1).indices
    correct = top5[:, 0] == yt
    per_class = {int(c): float(correct[yt == c].float().mean()) for c in range(n_classes) if (yt == c).any()}
    return {"top1": float(correct.float().mean()), "top5": float((top5 == yt[:, None]).any(1).float().mean()),
            "per_class_top1": per_class, "n_test": len(y)}


def _autocast(device: torch.device, spec: TrainSpec | None):  # -> context manager
    """bfloat16 autocast on a GPU when the recipe asks for AMP; a no-op context on the CPU."""
    enabled = bool(spec is not None and spec.amp and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


SHUFFLE_BLOCK_BYTES = 8 * 2**20  # contiguous rows read together when a training set is larger than its shuffle buffer


def shuffle_geometry(row_bytes: int, spec: TrainSpec) -> tuple[int, int]:
    """(rows per block, rows per buffer) of the block-shuffled order for images of `row_bytes` bytes."""
    row_bytes = max(1, int(row_bytes))
    block = max(1, SHUFFLE_BLOCK_BYTES // row_bytes)
    return block, max(block, spec.shuffle_buffer_mb * 2**20 // row_bytes)


@functools.lru_cache(maxsize=2)  # the current epoch and the next; with aug_share, each stream's current one
def epoch_order(seed: int, epoch: int, n: int, block_rows: int = 1, buffer_rows: int | None = None,
                stream: str = "") -> torch.Tensor:
    """The order of the n training rows in epoch `epoch`: a pure function of (seed, epoch) and the geometry.

    A set that fits its shuffle buffer (`buffer_rows`) gets a uniform random permutation. A larger one (ImageNet-10 %
    with 512 added images a class: a decode cache of ~1 TB) is read as storage likes, as webdataset's and FFCV's
    quasi-random orders do: the rows are cut into blocks of `block_rows` contiguous rows (8 MiB), the blocks are
    permuted, and each run of buffer_rows / block_rows consecutive blocks of that permutation is shuffled row by row.
    A batch then touches a few dozen blocks read whole, instead of one page run per image anywhere in the file.
    """
    g = torch.Generator().manual_seed(item_seed(seed, "train", "perm", epoch) if not stream
                                      else item_seed(seed, "train", "perm", stream, epoch))
    if buffer_rows is None or n <= buffer_rows or block_rows <= 1:
        return torch.randperm(n, generator=g)
    n_blocks = -(-n // block_rows)
    blocks = torch.randperm(n_blocks, generator=g)
    per_buffer = max(1, buffer_rows // block_rows)
    out = []
    for i in range(0, n_blocks, per_buffer):
        starts = blocks[i:i + per_buffer] * block_rows
        rows = (starts[:, None] + torch.arange(block_rows)[None, :]).reshape(-1)
        rows = rows[rows < n]
        out.append(rows[torch.randperm(len(rows), generator=g)])
    return torch.cat(out)


def batch_indices(seed: int, step: int, n: int, bs: int, block_rows: int = 1, buffer_rows: int | None = None,
                  stream: str = "") -> torch.Tensor:
    """The sample indices of training step `step`: a pure function of (seed, step).

    Epoch e is the order `epoch_order(seed, e, ...)`; step s takes its (s mod steps_per_epoch)-th
    batch (the last partial batch of an epoch is dropped). Nothing about the data order lives in
    a generator's state, so a run resumed at any step sees exactly the batches an uninterrupted run sees.
    """
    per_epoch = max(n // bs, 1)
    epoch, pos = divmod(step, per_epoch)
    return epoch_order(seed, epoch, n, block_rows, buffer_rows, stream)[pos * bs:(pos + 1) * bs]


def mixed_batch_indices(seed: int, step: int, n_real: int, n: int, bs: int, share: float, block_rows: int = 1,
                        buffer_rows: int | None = None) -> torch.Tensor:
    """A batch with round(share x bs) added images (rows n_real..n-1) and the rest real (rows 0..n_real-1), each part
    drawn from its own epoch orders (the real images cycle faster or slower than the added ones), so the share holds in
    every batch whatever the two sets' sizes. A pure function of (seed, step), as `batch_indices`."""
    k_aug = round(share * bs) if n > n_real else 0
    k_aug = bs if n_real == 0 else k_aug
    k_real = bs - k_aug
    real = batch_indices(seed, step, n_real, k_real, block_rows, buffer_rows, "real") if k_real else torch.zeros(0, dtype=torch.int64)
    aug = (n_real + batch_indices(seed, step, n - n_real, k_aug, block_rows, buffer_rows, "aug")) if k_aug \
        else torch.zeros(0, dtype=torch.int64)
    return torch.cat([real, aug])


def augment_batch(x: torch.Tensor, spec: TrainSpec, seed: int, step: int) -> torch.Tensor:
    """The recipe's augmentation of one batch (uint8 NHWC -> float NCHW), seeded by (seed, step)."""
    g = torch.Generator().manual_seed(item_seed(seed, "train", "augment", step))
    if spec.augment == "rrc":
        out = random_resized_crop(x, spec.input_size, g, scale=spec.crop_scale)
    else:
        out = shift_flip(x, g)
        out = center_crop(out, spec.input_size) if out.shape[-1] != spec.input_size else out
    if spec.colour_invariance:
        out = colour_invariance(out, torch.Generator().manual_seed(item_seed(seed, "train", "colour", step)))
    return out


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _first_difference(old: object, new: str) -> str:
    """Which identity field changed, for the log line that says why a checkpoint is not used."""
    try:
        a, b = json.loads(str(old)), json.loads(new)
    except ValueError:
        return "written by another version"
    return ", ".join(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)) or "none"


def resume_path(out_ckpt: Path) -> Path:
    """Where the resumable checkpoint lives: beside the outputs, not one of them (Snakemake would delete it)."""
    return Path(out_ckpt).with_name("resume.pt")


def _load_resume(path: Path, identity: str, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, float | None]:
    """Restore (step, loss EMA) from a checkpoint of the same run; anything else starts from step 0."""
    if not path.exists():
        return 0, None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers: never unpickle code
    except Exception as exc:  # a checkpoint is written atomically, but a foreign or damaged file must not stop the run
        log.warning("train: %s unreadable (%s); starting from step 0", path, exc)
        return 0, None
    if state.get("identity") != identity:
        log.warning("train: %s belongs to another run (its spec, seed or input files differ: %s); starting from step 0",
                    path, _first_difference(state.get("identity"), identity))
        return 0, None
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    log.info("train: resumed from %s at step %d", path, state["step"])
    return int(state["step"]), state["loss_ema"]


def train(real: list[Path], root: Path, test: Path, augment: list[Path], n_aug: int, seed: int,
          n_classes: int, out_metrics: Path, out_ckpt: Path, spec: TrainSpec) -> dict[str, object]:
    """Train from scratch on real (+ augmentation) images and write metrics and the final checkpoint.

    Every `spec.checkpoint_every` steps the model, optimiser state, step and loss EMA go to
    `resume.pt` beside the outputs; a rerun of the same (spec, seed, data) continues from there.
    """
    started = time.time()
    if spec.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(item_seed(seed, "train", "init"))
    device = pick_device()
    if device.type == "cuda" and not spec.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    load = spec.load_size or spec.input_size
    skips: dict[str, Counter[str]] = {"train": Counter(), "aug": Counter(), "test": Counter()}
    parts = [_source(t, root, load, None, skips["train"]) for t in real]
    n_real = sum(len(p[1]) for p in parts)
    parts += [_source(m, root, load, n_aug, skips["aug"]) for m in augment]
    data = Rows([(arr, rows) for arr, rows, _ in parts])
    y = np.concatenate([p[2] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
    test_arr, test_rows, y_test = _source(test, root, load, None, skips["test"])
    x_test = Rows([(test_arr, test_rows)])
    log.info("train: %d real + %d augmentation images, %d test, device %s, spec %s", n_real, len(y) - n_real, len(y_test), device, spec)
    model = build_model(spec, n_classes).to(device)
    if spec.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=spec.lr, momentum=spec.momentum, nesterov=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing)
    # added images weighed or smoothed apart from real ones: a per-image loss (a real image weighs 1)
    weighed = spec.aug_loss_weight != 1.0 or spec.aug_label_smoothing is not None
    per_image = nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing, reduction="none")
    aug_smooth = spec.label_smoothing if spec.aug_label_smoothing is None else spec.aug_label_smoothing
    per_aug_image = nn.CrossEntropyLoss(label_smoothing=aug_smooth, reduction="none")
    aug_weight = torch.tensor(spec.aug_loss_weight, device=device)
    bs = min(spec.batch_size, len(y))
    steps_per_epoch = max(len(y) // bs, 1)
    total = max(spec.epochs * steps_per_epoch, spec.min_steps)
    warmup = min(spec.warmup_epochs * steps_per_epoch, total // 5)
    mean, std = MEAN.to(device), STD.to(device)
    resume = resume_path(out_ckpt)
    # a checkpoint continues only the run of the same spec, seed and input files (by content: a regenerated augmentation
    # set of the same size is another run), so a rerun after changed inputs starts from step 0
    inputs = [*real, test, *augment, *pointed_shards([m for m in augment if not is_decoded(m)])]
    identity = canonical_json({"spec": spec_dict(spec), "seed": seed, "n_aug": n_aug, "n_train": len(y),
                               "inputs": [content_id(f) for f in inputs]})
    start, loss_ema = _load_resume(resume, identity, model, opt)
    model.train()
    anon_peak = rss_anon_mb()
    order = shuffle_geometry(int(np.prod(data.shape)), spec)
    indices = None
    if spec.aug_share is not None and len(y) > n_real:  # with no added image the share means nothing
        def indices(step: int) -> torch.Tensor:
            return mixed_batch_indices(seed, step, n_real, len(y), bs, spec.aug_share, *order)
    batches = prefetch(data, y, seed, start, total, bs, pin=device.type == "cuda", order=order, indices=indices)
    for step, (xb_u8, yb, rows) in zip(range(start, total), batches, strict=True):
        lr = lr_at(step, total, warmup, spec.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        # uint8 to the device first: on a GPU the crop / resize runs there (on one CPU thread it was the bottleneck:
        # 144 img/s against 4,300 img/s of ResNet-50 compute on an H200)
        xb = (augment_batch(xb_u8.to(device, non_blocking=True), spec, seed, step) - mean) / std
        if spec.channels_last and device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(device, spec):
            logits, yd = model(xb).float(), yb.to(device, non_blocking=True)
            if weighed:
                is_aug = torch.from_numpy(rows >= n_real).to(device)
                loss = torch.where(is_aug, aug_weight * per_aug_image(logits, yd), per_image(logits, yd)).mean()
            else:
                loss = loss_fn(logits, yd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if step % 100 == 0 or step == total - 1:
            anon_peak = max(anon_peak, rss_anon_mb())
            log.info("train: step %d/%d loss %.4f lr %.3f (%.0fs)", step, total, loss_ema, lr, time.time() - started)
        if spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0 and step + 1 < total:
            save_torch(resume, {"identity": identity, "step": step + 1, "loss_ema": loss_ema, "model": model.state_dict(),
                                "optimizer": opt.state_dict()})
    metrics = evaluate(model, x_test, y_test, n_classes, device, spec)
    metrics.update({"n_real": n_real, "n_aug_images": int(len(y) - n_real), "n_aug_per_class": n_aug, "seed": seed,
                    "steps": total, "resumed_from_step": start, "final_loss": loss_ema,
                    "skipped": {split: sum(c.values()) for split, c in skips.items()},
                    "skipped_by_reason": {split: dict(sorted(c.items())) for split, c in skips.items() if c},
                    "train_seconds": round(time.time() - started, 1),
                    # the process's own (anonymous) memory: decoded images are memory-mapped, so it does not grow with them
                    "memory_mb": {"anon_peak": round(max(anon_peak, rss_anon_mb()), 1), "rss_peak": round(peak_rss_mb(), 1)}})
    save_torch(out_ckpt, {"model": model.state_dict(), "spec": spec_dict(spec), "seed": seed, "n_aug": n_aug})
    write_json(out_metrics, metrics)
    write_meta(out_metrics, "train", spec_dict(spec), started, seed=seed, n_aug=n_aug, device=str(device),
               inputs={"real": [str(p) for p in real], "augment": [str(a) for a in augment]})
    resume.unlink(missing_ok=True)
    log.info("train: top1 %.4f top5 %.4f in %.0fs", metrics["top1"], metrics["top5"], time.time() - started)
    return metrics


ALL_RANKS = 2**62  # an n_aug that keeps every image of a set


def load_classifier(ckpt: Path, n_classes: int) -> tuple[nn.Module, TrainSpec, torch.device]:
    """(model on the job's device, its training spec, the device) of a classifier checkpoint written by `train`."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    spec = parse_spec(TrainSpec, json.dumps(state["spec"]))
    model = build_model(spec, n_classes)
    model.load_state_dict(state["model"])
    device = pick_device()
    return model.to(device), spec, device


def judge(ckpt: Path, judge_metrics: Path, images: Path, classes: Path, out: Path) -> dict[str, object]:
    """Score a method's generated images with the judge: a classifier trained on the target's own labelled images.

    `images` is the set's decoded folder (the workflow: memory-mapped, scored 256 at a time, so a 512k-image set is
    never held in memory) or its manifest (decoded here, for small sets and direct use).

    CLIP's zero-shot `generation_fidelity` is measured by the model family the generator was built on (the toy
    LDM's text encoder is the toy CLIP's text tower); the judge shares nothing with it, so where the two agree
    the figure is about the images, not about one model's blind spots.
    """
    started = time.time()
    keys = list(json.loads(Path(classes).read_text())["classes"])
    model, spec, device = load_classifier(ckpt, len(keys))
    skips: Counter[str] = Counter()
    arr, rows, y = _source(Path(images), Path("."), spec.load_size or spec.input_size, ALL_RANKS, skips)
    scored = (evaluate(model, Rows([(arr, rows)]), y, len(keys), device, spec) if len(y)
              else {"top1": float("nan"), "per_class_top1": {}})
    judge_run = read_metrics(judge_metrics)
    result = {"judge_fidelity": scored["top1"], "per_class": {keys[c]: v for c, v in scored["per_class_top1"].items()},
              "images": len(y), "skipped": int(sum(skips.values())),
              "judge_test_top1": judge_run["top1"], "judge_train_images": judge_run["n_real"]}
    write_json(out, result)
    write_meta(out, "judge", spec_dict(spec), started, judge=str(ckpt))
    log.info("judge: %s: %.3f of %d images (judge test top-1 %.3f)", images, result["judge_fidelity"], len(y),
             result["judge_test_top1"])
    return result


def read_metrics(path: Path) -> dict[str, object]:
    """Load a metrics.json, naming the file on error."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read metrics: {exc}") from exc
