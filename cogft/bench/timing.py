"""Timing helpers shared by the benchmarks: synchronised steps, back-to-back steps, a clean slate, a profile."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run_step: Callable[[int], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls after `warmup` untimed ones, synchronised one by one."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        started = time.perf_counter()
        run_step(i)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times


def time_back_to_back(run_step: Callable[[int], None], device: torch.device, first: int, steps: int) -> float:
    """Mean s/step over `steps` steps launched without a sync between them, as the trainer runs them
    (it reads each step's scalars during the next); `time_steps`' per-step syncs add the launch gap."""
    sync(device)
    started = time.perf_counter()
    for i in range(first, first + steps):
        run_step(i)
    sync(device)
    return (time.perf_counter() - started) / steps


def reset_peak(device: torch.device) -> None:
    """Start the peak-memory count from what is allocated now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    """Drop what the last measurement left: garbage, cached blocks, peak statistics, compiled graphs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)
    torch._dynamo.reset()


def profile(run: Callable[[int], None], device: torch.device) -> None:
    """One more step under torch.profiler; the kernels that took the most time go to stderr."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        run(10_000)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90), file=sys.stderr)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
