"""Real target datasets (ImageNet, Caltech256, any ImageFolder tree) as the split tables every stage reads.

The toy world writes `target/{split}.parquet` (path, label, class) and `classes.json`; this module
writes the same files for a class-per-folder dataset, so retrieval, personalisation, generation
and the classifier never know which world they are in:

- `train`: the real training images: a stratified subset (`train_fraction` of each class, at
  least one image, or `train_per_class` images) drawn with a fixed seed — ImageNet-10 % is
  `train_fraction: 0.1`;
- `train_extra`: as many again, disjoint from `train` (the `real_x2` upper bound: 20 % ImageNet);
- `val`: `val_per_class` further images of each class's training folder (for the leak filter and
  model selection, never trained on);
- `test`: the held-out evaluation split: every image of `test_dir` (ImageNet's 50k val images), or,
  for datasets without one (Caltech256), `test_per_class` of the images left over.

Paths in the tables are absolute, so `root / path` (how every stage resolves them) is the path itself.

A class's *key* names its files and jobs (wildcards, folders, shard members); its *folder* is where its images
are; its *name* goes into prompts. A folder name that is not a safe key (Caltech-256's `001.ak47`, spaces,
apostrophes, non-ASCII letters) gets a slug key, `class_key`; the display name keeps the original spelling.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from augbench.io import write_json, write_meta, write_parquet
from augbench.specs import item_seed, spec_dict

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
DATA = Path(__file__).parent / "data"
CLASS_LISTS = {"imagenet": DATA / "imagenet_classes.tsv"}


@dataclass(frozen=True)
class TargetSpec:
    """A class-per-folder target dataset (see `config/imagenet10.yaml`, `config/caltech256.yaml`)."""

    root: str = ""
    train_dir: str = "train"
    test_dir: str | None = "val"
    class_list: str = "folders"
    train_fraction: float | None = 0.1
    train_per_class: int | None = None
    val_per_class: int = 10
    test_per_class: int | None = None
    seed: int = 0
    version: int = 1


def _read_tsv(path: Path) -> list[tuple[str, str]]:
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    if not rows or rows[0][:2] not in (["wnid", "name"], ["key", "name"]):
        raise ValueError(f"{path}: a class list needs a header line 'key<TAB>name' (or 'wnid<TAB>name')")
    bad = [i for i, r in enumerate(rows[1:], start=2) if len(r) < 2 or not r[0]]
    if bad:
        raise ValueError(f"{path}: line(s) {bad[:5]} are not 'key<TAB>name'")
    return [(r[0], r[1]) for r in rows[1:]]


SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def class_key(folder: str) -> str:
    """The key of a class folder: the folder name itself where it is safe in paths, wildcards, shell words and
    webdataset member names (letters, digits, `_`, `-`); else an ASCII slug plus 6 hex of the name's sha1, so two
    folders never share a key ("001.ak47" -> "001_ak47-<hash>", "crème brûlée" -> "creme_brulee-<hash>")."""
    if SAFE_KEY.fullmatch(folder) and len(folder) <= 64:  # (a key is also a file name: at most 255 bytes)
        return folder
    ascii_name = unicodedata.normalize("NFKD", folder).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_name).strip("_-")[:48] or "class"
    return f"{base}-{hashlib.sha1(folder.encode()).hexdigest()[:6]}"


def target_classes(spec: TargetSpec) -> list[tuple[str, str]]:
    """(key, display name) of each class in label order; called at workflow parse time, so it is cheap.

    `class_list` is `imagenet` (the shipped wnid/name table, no disk scan), `folders` (the sorted
    sub-folders of `root/train_dir`; Caltech256's "001.ak47" becomes the name "ak47"), or a path to
    a `key<TAB>name` table (key: the folder name). Keys are `class_key` of the folder names.
    """
    classes = [(class_key(folder), name) for folder, name in class_folders(spec)]
    seen: dict[str, int] = {}
    for i, (key, _) in enumerate(classes):
        if key in seen:
            raise ValueError(f"target: classes {seen[key]} and {i} have the same key {key!r} (class list {spec.class_list!r})")
        seen[key] = i
    return classes


def class_folders(spec: TargetSpec) -> list[tuple[str, str]]:
    """(folder name, display name) of each class in label order (see `target_classes`)."""
    root = Path(spec.root)
    if not spec.root or not root.is_dir():
        raise FileNotFoundError(f"target.root {spec.root!r} does not exist or is not a folder (set it in your config)")
    train = root / spec.train_dir
    if not train.is_dir():
        raise FileNotFoundError(f"target.root {spec.root!r}: no training folder {train} (target.train_dir)")
    if spec.class_list in CLASS_LISTS:
        return _read_tsv(CLASS_LISTS[spec.class_list])
    if spec.class_list != "folders":
        return _read_tsv(Path(spec.class_list))
    folders = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{train}: no class folders")
    return [(k, _display_name(k)) for k in folders]


def _display_name(folder: str) -> str:
    """A prompt-friendly name from a folder name: Caltech256's "253.faces-easy-101" -> "faces easy"."""
    number, dot, rest = folder.partition(".")
    name = rest if dot and number.isdigit() else folder
    return name.removesuffix("-101").replace("_", " ").replace("-", " ")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def build_target(spec: TargetSpec, out: Path) -> dict[str, int]:
    """Write `target/{train,train_extra,val,test}.parquet` and `classes.json` under `out`."""
    started = time.time()
    folders = class_folders(spec)
    classes = [(class_key(folder), name) for folder, name in folders]
    root = Path(spec.root)
    splits: dict[str, list[dict[str, object]]] = {s: [] for s in ("train", "train_extra", "val", "test")}
    empty, short = [], []
    for label, ((key, _), (folder, _)) in enumerate(zip(classes, folders, strict=True)):
        files = _images(root / spec.train_dir / folder)
        if not files:
            empty.append(folder)
            continue
        random.Random(item_seed(spec.seed, "target", key)).shuffle(files)
        n = spec.train_per_class if spec.train_per_class is not None else max(1, round((spec.train_fraction or 0) * len(files)))
        # train, train_extra (real_x2, the judge) and val are cut from the folder: each must get all it asks for,
        # and a test split drawn from the folder at least one image; a split short of it would be written silently
        need = 2 * n + spec.val_per_class + ((spec.test_per_class or 1) if spec.test_dir is None else 0)
        if len(files) < need:
            short.append(f"{folder} has {len(files)} images, needs {need} ({n} train + {n} train_extra + {spec.val_per_class} val"
                         f"{f' + {spec.test_per_class or 1} test' if spec.test_dir is None else ''})")
            continue
        cuts = {"train": files[:n], "train_extra": files[n:2 * n], "val": files[2 * n:2 * n + spec.val_per_class]}
        rest = files[2 * n + spec.val_per_class:]
        if spec.test_dir is None:
            cuts["test"] = rest[: spec.test_per_class] if spec.test_per_class is not None else rest
        else:
            cuts["test"] = _images(root / spec.test_dir / folder)
        for split, chosen in cuts.items():
            splits[split] += [{"path": str(p.resolve()), "label": label, "class": key} for p in chosen]
    if empty:
        raise ValueError(f"target.root {spec.root!r}: {len(empty)} class folder(s) missing or without images under "
                         f"{spec.train_dir}/, e.g. {empty[:5]}")
    if short:
        raise ValueError(f"target.root {spec.root!r}: {len(short)} class folder(s) under {spec.train_dir}/ have fewer images than "
                         f"the splits ask for (target.train_per_class / train_fraction, val_per_class"
                         f"{', test_per_class' if spec.test_dir is None else ''}): " + "; ".join(short[:20])
                         + (f"; and {len(short) - 20} more" if len(short) > 20 else ""))
    counts = {}
    for split, rows in splits.items():
        write_parquet(out / f"target/{split}.parquet", pd.DataFrame(rows, columns=["path", "label", "class"]))
        counts[split] = len(rows)
    if counts["test"] == 0:
        raise ValueError(f"target.root {spec.root!r}: the test split is empty (target.test_dir / test_per_class)")
    write_json(out / "classes.json", {"classes": [k for k, _ in classes], "names": dict(classes),
                                      "folders": {k: folder for (k, _), (folder, _) in zip(classes, folders, strict=True)}})
    write_meta(out / "classes.json", "target", spec_dict(spec), started, counts=counts)
    log.info("target: %d classes, %s", len(classes), counts)
    return counts
