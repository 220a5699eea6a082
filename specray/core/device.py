"""Pick the torch device a process should use from what it was given."""
from __future__ import annotations

import torch


def pick_device(name: str = "auto") -> torch.device:
    """`auto` means the first visible CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device
