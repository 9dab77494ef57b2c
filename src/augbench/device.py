"""Device selection that never trusts `CUDA_VISIBLE_DEVICES` alone.

A Slurm GPU job can have the variable set with no usable GPU behind it (a fake GRES, a broken
driver); asking torch is the only check that counts, and falling back is logged so the Slurm log
says why a job ran slowly.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def pick_device(prefer: str = "auto") -> torch.device:
    """Return `cuda` when torch can really use a GPU (and `prefer` allows it), else `cpu`."""
    if prefer == "cpu":
        return torch.device("cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        usable = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except RuntimeError as exc:  # a broken driver raises instead of answering False
        log.warning("device: CUDA check failed (%s); using CPU", exc)
        usable = False
    if usable:
        return torch.device("cuda")
    if visible not in (None, ""):
        log.warning("device: CUDA_VISIBLE_DEVICES=%s but no usable GPU; falling back to CPU", visible)
    elif prefer == "cuda":
        log.warning("device: a GPU was asked for but none is usable; falling back to CPU")
    return torch.device("cpu")
