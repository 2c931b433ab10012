"""Timing, peak-memory and environment helpers for the benchmarks (CPU or CUDA).

Time: median wall-clock seconds over ``repeat`` calls after ``warmup`` calls
(``torch.cuda.synchronize`` around each call on a GPU).
Peak memory:
* CUDA: ``torch.cuda.max_memory_allocated`` minus the bytes allocated before the call.
* CPU: the process's resident-set high-water mark (``VmHWM``) minus the resident set
  before the call.  Before each measurement freed heap memory goes back to the OS
  (glibc ``malloc_trim``) and the high-water mark is reset (``/proc/self/clear_refs``
  = 5, Linux >= 4.0), so the figure is the extra resident memory the call needed.
  torch's CPU allocator does not cache, so this tracks tensor memory closely; it
  also counts allocator fragmentation.  None when /proc is unavailable.
"""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
from typing import Callable, Optional

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5, device: str = "cpu") -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------- memory
def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> Optional[int]:
    """Current resident set size of this process in bytes (None without /proc)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def hwm_bytes() -> Optional[int]:
    """Resident-set high-water mark of this process in bytes (None without /proc)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc only; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_hwm() -> bool:
    """Reset the resident-set high-water mark to the current RSS; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> Optional[int]:
    """Extra bytes at the peak of one ``fn()`` call, above what was in use before it (see module doc)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    trim_heap()
    if not reset_hwm():
        return None
    base = rss_bytes()
    fn()
    peak = hwm_bytes()
    if base is None or peak is None:
        return None
    return max(0, peak - base)


# ---------------------------------------------------------------------- environment
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{_cpu_name()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"


def environment(device: str) -> dict:
    """Device and versions, for the JSON and the printed header."""
    env = {
        "device": device,
        "device_name": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    for mod in ("triton", "transformers", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            env[mod] = None
    try:
        env["loadavg_1m_start"] = os.getloadavg()[0]
    except OSError:
        env["loadavg_1m_start"] = None
    return env
