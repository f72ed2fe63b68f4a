"""Peak extra memory of one call of a bench step: the CUDA allocator's peak, or on Linux CPUs
the rise of the process's peak resident set."""
from __future__ import annotations

import ctypes
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


def _release_free_heap() -> None:
    """Hand the pages of every free malloc block back to the system (glibc's malloc_trim).
    Blocks freed by earlier steps stay in glibc's heap, where the measured step reuses them
    without raising the resident set; released, they count again when the step touches them.
    Malloc's own settings are left as they are, so the timed steps see what a user's process
    sees."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _resident_peak_mib(step) -> float | None:
    """The rise of the process's peak resident set (VmHWM, reset through clear_refs) over its
    resident set before the step, once free heap pages are released. Page-level: steps that
    allocate well under a MiB are within its noise."""
    _release_free_heap()
    try:
        before = _proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:  # not Linux, or /proc is read-only
        return None
    step()
    return (_proc_status_kib("VmHWM") - before) / 1024
