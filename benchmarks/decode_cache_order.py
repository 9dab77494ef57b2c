"""Reading the decode cache cold: the training loader's block-shuffled order against a uniform random order.

A training set larger than memory (ImageNet-10 % with 512 added images a class is ~1 TB at 256 px) cannot stay in the
page cache, so each epoch reads it from storage again. This benchmark writes a decoded folder as `augbench decode` does
(`images.npy`, N x S x S x 3 uint8, memory-mapped by training) and runs `augbench.classify.prefetch` over it (the
loader of `augbench train`, no model) for the first `--steps` steps of an epoch in two orders, each starting cold:
the file's pages are dropped with posix_fadvise(DONTNEED) before every pass, and each pass runs in a child process inside a memory cgroup of
`--memory-mb` (page cache included), so the set is larger than the memory the loader may keep of it, as on a cluster
node reading a 1 TB cache (without a writable cgroup the pass runs unconfined and says so).
  * random: a uniform permutation per epoch (what training did before: `epoch_order` with a buffer as large as the set);
  * blocks: 8 MiB blocks of contiguous rows, shuffled within a `--buffer-mb` buffer (`epoch_order`, the default
    geometry `shuffle_geometry` for a set larger than `train.shuffle_buffer_mb`).
Passes are interleaved (random, blocks, random, blocks, ...); medians and spreads of images/s and of the major page
faults (reads that went to storage, getrusage) are printed, and the ratio blocks / random.

    PYTHONPATH=src python benchmarks/decode_cache_order.py                       # 80,000 images at 128 px: 3.7 GiB
    PYTHONPATH=src python benchmarks/decode_cache_order.py --images 200000 --side 256 --dir /scratch/me

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from augbench.classify import SHUFFLE_BLOCK_BYTES, prefetch  # noqa: E402
from augbench.decoded import Rows, open_decoded  # noqa: E402


def write_folder(out: Path, n: int, side: int) -> None:
    """A decoded folder as `augbench decode` writes it, filled with noise (content does not change the reads)."""
    out.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8, shape=(n, side, side, 3))
    rng = np.random.default_rng(0)
    for i in range(0, n, 1024):
        images[i:i + 1024] = rng.integers(0, 256, (min(1024, n - i), side, side, 3), dtype=np.uint8)
    images.flush()
    del images
    np.save(out / "labels.npy", np.arange(n) % 1000)
    np.save(out / "ranks.npy", np.full(n, -1))
    (out / "stats.json").write_text(json.dumps({"images": n, "decoded": n, "size": side, "skipped": 0}))


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def one_epoch(folder: Path, batch: int, order: tuple[int, int | None], seed: int, steps: int) -> tuple[float, int]:
    """images/s and major page faults of the first `steps` steps of a cold epoch through the training loader."""
    drop_cache(folder / "images.npy")
    images, rows, labels, _ = open_decoded(folder)
    data = Rows([(images, rows)])
    steps = min(steps, len(labels) // batch)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    started = time.perf_counter()
    for _ in prefetch(data, labels, seed, 0, steps, batch, pin=False, order=order):
        pass
    seconds = time.perf_counter() - started
    return steps * batch / seconds, resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults


def confined(memory_mb: int) -> tuple[Path | None, str]:
    """A memory cgroup limited to `memory_mb` (v1 or v2), and the file a process joins it through."""
    for root, limit, join in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "tasks"),
                              ("/sys/fs/cgroup", "memory.max", "cgroup.procs")):
        group = Path(root) / f"augbench_bench_{os.getpid()}"
        try:
            group.mkdir()
            (group / limit).write_text(str(memory_mb * 2**20))
            return group, join
        except OSError:
            if group.exists():
                group.rmdir()
    return None, ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=80_000)
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40, help="steps of each cold epoch measured (a whole epoch: a large number)")
    ap.add_argument("--buffer-mb", type=int, default=256, help="shuffle buffer of the blocks arm")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default=str(REPO / "benchmarks" / "_decode_cache_order"), help="on the storage to measure")
    ap.add_argument("--memory-mb", type=int, default=1536, help="memory cgroup of each pass (process and page cache)")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # block rows, buffer rows (0: none), seed: one pass
    a = ap.parse_args()
    folder = Path(a.dir)
    if a.one:
        block_rows, buffer_rows, seed = map(int, a.one)
        print(json.dumps(one_epoch(folder, a.batch, (block_rows, buffer_rows or None), seed, a.steps)))
        return
    row = a.side * a.side * 3
    group, join = confined(a.memory_mb)
    try:
        write_folder(folder, a.images, a.side)
        block = max(1, SHUFFLE_BLOCK_BYTES // row)
        arms = {"random": (1, 0), "blocks": (block, max(block, a.buffer_mb * 2**20 // row))}
        got: dict[str, list[tuple[float, int]]] = {k: [] for k in arms}
        for r in range(a.repeats):
            for name, (block_rows, buffer_rows) in arms.items():
                cmd = [sys.executable, __file__, "--dir", str(folder), "--batch", str(a.batch), "--steps", str(a.steps),
                       "--one", str(block_rows), str(buffer_rows), str(r)]
                enter = (lambda: (group / join).write_text(str(os.getpid()))) if group else None
                res = subprocess.run(cmd, capture_output=True, text=True, check=True, preexec_fn=enter)
                got[name].append(tuple(json.loads(res.stdout.strip().splitlines()[-1])))
        size = a.images * row / 2**30
        where = f"each pass in a {a.memory_mb} MB memory cgroup" if group else "no memory cgroup (unconfined: the set fits)"
        print(f"decode cache {a.images} x {a.side}px ({size:.2f} GiB) on {folder}, batch {a.batch}, {a.steps} steps of cold epochs "
              f"(page cache dropped), {where}, {a.repeats} interleaved repeats; blocks of {block} rows (8 MiB) in a "
              f"{a.buffer_mb} MB buffer; read_ahead_kb {_readahead(folder)}")
        for name, runs in got.items():
            rates, faults = [x[0] for x in runs], [x[1] for x in runs]
            spread = f" (min {min(rates):.0f}, max {max(rates):.0f})" if len(rates) > 1 else ""
            print(f"  {name:<7} {statistics.median(rates):8.0f} images/s{spread}   major faults {statistics.median(faults):9.0f}")
        ratio = statistics.median(x[0] for x in got["blocks"]) / statistics.median(x[0] for x in got["random"])
        print(f"  ratio blocks / random: {ratio:.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if group:
            group.rmdir()


def _readahead(folder: Path) -> str:
    """The block device's readahead (what a page fault on a memory map reads around it), for the printout."""
    try:
        dev = os.stat(folder.parent if not folder.exists() else folder).st_dev
        name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
        return Path(f"/sys/block/{name}/queue/read_ahead_kb").read_text().strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
