"""Per-sample peak memory: process RSS on CPU, allocated CUDA memory on GPU.

CPU: before a sample the kernel's peak-RSS counter is reset by writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0); after it ``VmHWM`` of ``/proc/self/status`` is that
sample's peak resident set of the whole process (model weights included). Where the reset is not
permitted, ``VmHWM`` is the lifetime peak and ``peak_reset`` says so. GPU:
``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``.
"""

from __future__ import annotations

from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset the peak counters; return whether the CPU peak could be reset."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """``VmHWM`` in MiB (peak RSS since the last reset), None off Linux."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_gpu_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
