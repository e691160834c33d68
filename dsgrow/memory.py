"""Peak memory of one phase of work (a growth step), on the host and on the accelerator.

Host: Linux's high-water mark of resident memory (VmHWM), reset at the start of a phase by
writing 5 to /proc/self/clear_refs, so each phase reports its own peak rather than the
process's. Freed heap memory is handed back first (malloc_trim); run with
MALLOC_MMAP_THRESHOLD_=65536 for figures that follow live tensors closely (glibc otherwise
reuses freed memory in place, and a phase's peak can hide inside an earlier phase's). Where that is not available the process peak (ru_maxrss) is reported instead and
`host_exact` says so. Accelerator: torch.cuda's peak allocated bytes, reset the same way.
"""
from __future__ import annotations

import re
import resource
import time
from contextlib import contextmanager

import torch


def _status_mib(field: str) -> float | None:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else None


def rss_mib() -> float:
    v = _status_mib("VmRSS")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def file_mib() -> float | None:
    """Resident file-backed pages (RssFile): mostly shared libraries' code, paged in on first use
    and shared by every process on the machine that maps them, so not a rank's own memory."""
    return _status_mib("RssFile")


def trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so resident memory tracks live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_host_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextmanager
def phase(record: dict, name: str, device: torch.device | None = None):
    """Times the block and fills record[name] = {s, host_peak_mib, host_start_mib[, host_file_end_mib,
    gpu_peak_mib]}."""
    trim()
    exact = _reset_host_peak()
    start = rss_mib()
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if cuda:
            torch.cuda.synchronize(device)
        out = {"s": time.perf_counter() - t0, "host_start_mib": start,
               "host_peak_mib": (_status_mib("VmHWM") if exact else None) or rss_mib(), "host_exact": exact}
        code = file_mib()
        if code is not None:
            out["host_file_end_mib"] = code
        if cuda:
            out["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        record[name] = out
