"""Peak extra memory of one call of a bench step: the CUDA allocator's peak, or on Linux CPUs
the rise of the process's peak resident set."""
from __future__ import annotations

from pathlib import Path

import torch


def peak_extra_mib(step, device) -> float | None:
    """Memory one call of `step` needs above what was allocated before it, in MiB: the CUDA
    allocator's peak, or on Linux CPUs the peak resident set (see _resident_peak_mib)."""
    if device.type != "cuda":
        return _resident_peak_mib(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _resident_peak_mib(step) -> float | None:
    """The rise of the process's peak resident set (VmHWM, reset through clear_refs) over its
    resident set before the step. Exact for tensors of 64 KiB and more once glibc serves them
    with mmap, which returns them to the system when freed (set_malloc_for_peaks)."""
    try:
        before = _proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:  # not Linux, or /proc is read-only
        return None
    step()
    return (_proc_status_kib("VmHWM") - before) / 1024


def set_malloc_for_peaks() -> None:
    """A fixed mmap threshold of 64 KiB: glibc otherwise raises it as big blocks are freed and
    keeps them in its heap, where a later step reuses them without raising the peak."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except OSError:
        pass
