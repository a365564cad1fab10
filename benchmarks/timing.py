"""Timing helpers shared by the benchmark programs: median/IQR of repeated runs.

CUDA: CUDA events around each of back-to-back calls after warm-up (no L2 flush between calls:
the paper shapes are far larger than L2). CPU: time.perf_counter.
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
        # Back to back, one event pair per call, one sync at the end: the host may run ahead
        # as in a training step, so a call costs max(GPU time, host time).
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        torch.cuda.synchronize(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
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
