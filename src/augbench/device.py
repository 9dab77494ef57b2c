"""Device selection that never trusts `CUDA_VISIBLE_DEVICES` alone, and never falls back silently.

A Slurm GPU job can have the variable set with no usable GPU behind it (a fake GRES, a broken
driver); asking torch is the only check that counts. What a job may do without a GPU is the
config's `device` (passed to every GPU rule as `--device`, read here from AUGBENCH_DEVICE):
`cuda` fails the job, so GPU-hours are never booked for CPU work; `auto` uses the CPU and says so;
`cpu` never touches the GPU.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")


class GPUUnavailable(RuntimeError):
    """A GPU was required (device: cuda) and none is usable."""


def pick_device(prefer: str | None = None) -> torch.device:
    """`cuda` when torch can really use a GPU and `prefer` allows it, else `cpu` (auto) or GPUUnavailable (cuda).

    `prefer` defaults to the AUGBENCH_DEVICE environment variable, else `auto`.
    """
    prefer = prefer or os.environ.get("AUGBENCH_DEVICE") or "auto"
    if prefer not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {prefer!r}")
    if prefer == "cpu":
        return torch.device("cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = "torch.cuda.is_available() is False"
    try:
        usable = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except RuntimeError as exc:  # a broken driver raises instead of answering False
        usable, why = False, f"the CUDA check failed: {exc}"
    if usable:
        return torch.device("cuda")
    if prefer == "cuda":
        raise GPUUnavailable(f"device: cuda, but no GPU is usable ({why}; CUDA_VISIBLE_DEVICES={visible!r}); "
                             "set device: auto in the config to let GPU rules run on the CPU")
    if visible not in (None, ""):
        log.warning("device: CUDA_VISIBLE_DEVICES=%s but no usable GPU (%s); device: auto, so running on the CPU", visible, why)
    return torch.device("cpu")
