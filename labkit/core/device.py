"""Device, seeding and mixed precision: the one place that knows about CUDA, MPS and CPU."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def get_device(prefer: str | None = None) -> torch.device:
    """CUDA, then MPS, then CPU; ``prefer`` (or ``LABKIT_DEVICE``) overrides, e.g. ``"cpu"``."""
    name = prefer or os.environ.get("LABKIT_DEVICE")
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA, MPS), so a wall-clock timer measures it; a no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA; a no-op elsewhere (bf16 gave no CPU speed-up here, docs/design.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(device: torch.device | str):
    """Autocast switched off on ``device``: for computations whose result must not depend on the precision
    (cluster masking's patch similarities decide which patches are kept)."""
    return torch.autocast(torch.device(device).type, enabled=False)
