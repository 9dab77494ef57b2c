"""Hub models, fetched once into a cache folder that the GPU jobs load from.

`fetch_model` downloads one hub repository at one revision with `huggingface_hub.snapshot_download`
into `<cache>/<org>--<name>/<revision>/`, atomically, and leaves a marker recording the commit the
revision resolved to. The jobs then load the folder with `from_pretrained`, so a cluster whose GPU
nodes have no internet needs only the login node (where this local rule runs) to reach the hub.
"""

from __future__ import annotations

import re
import time
from pathlib import Path, PurePosixPath

from augbench.io import atomic_dir, write_json

MARKER = ".augbench_snapshot.json"
# weights in formats the diffusers/transformers loaders do not need beside the safetensors ones
IGNORE = ["*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "flax_model*", "tf_model*", "rust_model*"]


WEIGHT = re.compile(r"^(?P<stem>pytorch_model|model|diffusion_pytorch_model)(?P<rest>(\.[a-z0-9_]+)?(-\d{5}-of-\d{5})?)"
                    r"\.(?P<ext>bin|safetensors)(?P<index>\.index(\.[a-z0-9_]+)?\.json)?$")


def _twin_key(name: str) -> tuple[str, str, str] | None:
    """(folder, library family, variant + shard + index suffix) of a weight file, the same for its .bin and .safetensors
    forms: transformers names them pytorch_model*.bin / model*.safetensors, diffusers diffusion_pytorch_model* both."""
    path = PurePosixPath(name)
    m = WEIGHT.match(path.name)
    if m is None:
        return None
    family = "diffusers" if m["stem"] == "diffusion_pytorch_model" else "transformers"
    return str(path.parent), family, m["rest"] + (m["index"] or "")


def ignore_patterns(files: list[str]) -> list[str]:
    """The repository files a snapshot skips, from its file list: the formats no loader here reads (IGNORE); every `.bin`
    weight (and its shard index) that has a safetensors twin in the same folder (the loaders prefer safetensors, and
    SD v1-4's unet/ holds both: 3.4 GB each in fp32); the non-EMA UNet copies (`*.non_ema.*`, training-only); the
    safety checker's weights (the pipeline is loaded without it); and single-file checkpoints at the root of a
    diffusers repository (`v1-5-pruned-emaonly.safetensors` and the like, 4-7 GB each, which `from_pretrained` never
    opens). A repository with `.bin` weights only keeps them: nothing else would load."""
    ignore = list(IGNORE)
    safetensors = {_twin_key(f) for f in files if ".safetensors" in f and _twin_key(f) is not None}
    diffusers_repo = "model_index.json" in files
    for f in files:
        key = _twin_key(f)
        name = PurePosixPath(f)
        if key is not None and ".bin" in name.name and key in safetensors:
            ignore.append(f)
        elif ".non_ema." in name.name or (name.parts[0] == "safety_checker" and name.suffix in (".bin", ".safetensors")):
            ignore.append(f)
        elif diffusers_repo and len(name.parts) == 1 and name.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            ignore.append(f)
    return ignore


def snapshot_folder(cache: str | Path, repo_id: str, revision: str | None) -> Path:
    """Where a hub model at a revision lives in the cache."""
    return Path(cache) / repo_id.replace("/", "--") / (revision or "main")


def gated_error(repo_id: str, token: bool) -> PermissionError:
    """The one error for a gated repository this machine may not read: which repository, and what to do."""
    who = ("the account of the token in HF_TOKEN (or `hf auth login`) has not accepted it" if token else
           "no hub token is set: export HF_TOKEN=<a token of an account that accepted it> (or run `hf auth login`)")
    return PermissionError(f"{repo_id} is gated on the Hugging Face hub: accept its licence at "
                           f"https://huggingface.co/{repo_id}; {who}")


def fetch_model(repo_id: str, revision: str | None, out: Path) -> dict[str, object]:
    """Download `repo_id` at `revision` into `out` (atomically) and write its marker; returns the marker's content.

    The hub token comes from the environment (HF_TOKEN, or the one `hf auth login` stored), as huggingface_hub reads
    it. A gated repository (SD 3.5, FLUX.1-dev) without a token, or with one whose account has not accepted the
    licence, is one clear error naming the repository, raised here: this rule runs on the login node before any GPU
    job is submitted.
    """
    from huggingface_hub import HfApi, get_token, snapshot_download
    from huggingface_hub.errors import GatedRepoError

    started = time.time()
    token = get_token() is not None
    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except GatedRepoError:
        raise gated_error(repo_id, token) from None
    if info.gated and not token:
        raise gated_error(repo_id, token)
    skip = ignore_patterns([s.rfilename for s in info.siblings or []])
    with atomic_dir(out) as tmp:
        try:
            snapshot_download(repo_id, revision=info.sha, local_dir=str(tmp), ignore_patterns=skip)
        except GatedRepoError:
            raise gated_error(repo_id, token) from None
        meta = {"repo_id": repo_id, "revision": revision, "commit": info.sha, "seconds": round(time.time() - started, 1),
                "skipped": sorted(set(skip) - set(IGNORE))}
        write_json(tmp / MARKER, meta)
    return meta
