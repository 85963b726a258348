"""Hardware floors measured on the device the benchmark runs on (never typed in).

    hbm_bytes_per_s()             device memory copy, read + write counted (1 GiB; 256 MiB on CPU)
    host_to_device_bytes_per_s()  pinned host -> device copy (1 GiB); nan without CUDA

Each is measured once per process (best of 5 after a warm-up) and cached. The table in
docs/ARCHITECTURE.md ("Floors") is what the issues were written against; the benchmarks report
their ratios to these measured figures and record them in their JSON.
"""
from __future__ import annotations

import functools
import time

import torch


def running_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _best_seconds(fn, device: torch.device, repeats: int = 5) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def hbm_bytes_per_s(device: str = "") -> float:
    device = torch.device(device) if device else running_device()
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = _best_seconds(lambda: target.copy_(source), device)
    del source, target
    return 2 * size / seconds


@functools.lru_cache(maxsize=None)
def host_to_device_bytes_per_s(device: str = "") -> float:
    device = torch.device(device) if device else running_device()
    if device.type != "cuda":
        return float("nan")  # no host link to measure
    size = 1 << 30
    source = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(size, dtype=torch.uint8, device=device)
    seconds = _best_seconds(lambda: target.copy_(source, non_blocking=True), device)
    del source, target
    return size / seconds
