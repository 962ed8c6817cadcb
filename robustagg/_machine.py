"""Where a result came from: the device's name and the source commit (for bench and simulate)."""
from __future__ import annotations

import os
import platform
import subprocess

import torch


def device_name(device: torch.device, threads: int | None = None) -> str:
    """The GPU's name, or the CPU's model name with the torch thread count (``threads`` if given)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.get_num_threads() if threads is None else threads} threads)"


def commit() -> str | None:
    """The short git commit of this source tree, or None outside a git checkout."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
