"""Pick the torch device a process should use from what it was given, what memory it has free, and
move host arrays onto it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def pick_device(name: str = "auto") -> torch.device:
    """`auto` means the first visible CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def free_memory(device: torch.device | str) -> int | None:
    """Bytes free on `device`: the CUDA driver's count on a GPU, MemAvailable of /proc/meminfo on the
    CPU; None where it cannot be known (another OS, the meta device)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type != "cpu" or not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`: zero-copy on the CPU (no torch op at all), one host-to-device copy
    elsewhere."""
    t = torch.from_numpy(a)
    return t if device.type == "cpu" else t.to(device)
