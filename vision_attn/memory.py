"""Peak memory of a piece of work: the CUDA allocator's peak, or on CPU the process's high-water
resident set (Linux ``/proc/self/status`` ``VmHWM``, reset through ``/proc/self/clear_refs``)."""
from __future__ import annotations

import ctypes
import resource
from typing import Optional

import torch


def proc_status_kib(field: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or None without procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_cpu_peak() -> bool:
    """Set the process's high-water RSS to its current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_kib() -> int:
    """High-water RSS since the last :func:`reset_cpu_peak` (``ru_maxrss``, the lifetime peak, without procfs)."""
    hwm = proc_status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak, so runs that share a process (Hydra multirun) each report their own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_cpu_peak()  # not Linux / not permitted: the figure stays the process's lifetime peak


def peak_memory_mb(device: torch.device) -> float:
    """Peak since :func:`reset_peak_memory`: CUDA allocator peak on GPUs, the process's
    high-water RSS on CPU (model, activations, data and the Python runtime together)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return cpu_peak_kib() / 1024


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_memory(threshold: int = 64 * 1024) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes and more with ``mmap``, so freed tensors go
    back to the OS at once. glibc's own threshold rises to the largest chunk freed so far (up to
    32 MB): tile-sized activations then come from the heap, which keeps what they free and grows
    with the image (+0.7 GB at 4096², 512 px tiles). A fixed threshold, as ``bench`` runs use
    (``MALLOC_MMAP_THRESHOLD_``). False where glibc's ``mallopt`` is unavailable."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
