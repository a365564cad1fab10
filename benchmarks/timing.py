"""Timing helpers shared by the benchmark programs: median/IQR of repeated runs.

CUDA: CUDA events around each call after warm-up (L2 flushed between calls is NOT done:
inputs of the paper shapes are far larger than L2). CPU: time.perf_counter.
"""
import statistics
import time

import torch


def measure(fn, device, warmup=5, iters=20):
    """Run fn() warmup+iters times; returns dict(median_ms, q1_ms, q3_ms, iters)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": quartiles[0], "q3_ms": quartiles[2],
            "iters": iters}


def peak_memory(fn, device):
    """Peak bytes allocated on a CUDA device while running fn() (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
