"""Hub models, fetched once into a cache folder that the GPU jobs load from.

`fetch_model` downloads one hub repository at one revision with `huggingface_hub.snapshot_download`
into `<cache>/<org>--<name>/<revision>/`, atomically, and leaves a marker recording the commit the
revision resolved to. The jobs then load the folder with `from_pretrained`, so a cluster whose GPU
nodes have no internet needs only the login node (where this local rule runs) to reach the hub.
"""

from __future__ import annotations

import time
from pathlib import Path

from augbench.io import atomic_dir, write_json

MARKER = ".augbench_snapshot.json"
# weights in formats the diffusers/transformers loaders do not need beside the safetensors ones
IGNORE = ["*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "flax_model*", "tf_model*", "rust_model*"]


def snapshot_folder(cache: str | Path, repo_id: str, revision: str | None) -> Path:
    """Where a hub model at a revision lives in the cache."""
    return Path(cache) / repo_id.replace("/", "--") / (revision or "main")


def fetch_model(repo_id: str, revision: str | None, out: Path) -> dict[str, object]:
    """Download `repo_id` at `revision` into `out` (atomically) and write its marker; returns the marker's content."""
    from huggingface_hub import HfApi, snapshot_download

    started = time.time()
    info = HfApi().model_info(repo_id, revision=revision)
    with atomic_dir(out) as tmp:
        snapshot_download(repo_id, revision=info.sha, local_dir=str(tmp), ignore_patterns=IGNORE)
        meta = {"repo_id": repo_id, "revision": revision, "commit": info.sha, "seconds": round(time.time() - started, 1)}
        write_json(tmp / MARKER, meta)
    return meta
