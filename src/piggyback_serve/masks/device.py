"""Which torch device a device name means: "auto" is CUDA when present, else the CPU."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """`name` as a torch device; "auto" picks CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
