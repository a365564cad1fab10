"""How one callable is timed and how much memory it uses.

measure: `warmup` untimed calls, then `iters` timed calls -> median, quartiles, minimum (ms).
  CUDA: one event pair around each of back-to-back calls, one sync at the end (no L2 flush:
  the paper shapes are far larger than L2; the host may run ahead, as in a training step, so a
  call costs max(GPU time, host time)). CPU: time.perf_counter around each call; the thread
  count in use (torch.get_num_threads) goes into the run's environment (report.py).
peak_memory: extra bytes at the peak of one call. CUDA: torch.cuda.max_memory_allocated minus
  the bytes allocated before. CPU (Linux): growth of the process's peak resident set (VmHWM,
  reset through /proc/self/clear_refs after malloc_trim) over its resident set before the call
  — a proxy that sees every allocation, C++ temporaries and compiled code included; None where
  /proc is not writable.
saved_tensor_bytes: bytes autograd keeps for backward, from saved_tensors_hooks.
"""
import ctypes
import statistics
import time

import torch


def measure(fn, device, warmup=5, iters=20):
    """Run fn() warmup + iters times -> dict(median_ms, q1_ms, q3_ms, iqr_ms, min_ms, iters)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
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
        times = []
        for _ in range(iters):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return summarize_times(times)


def summarize_times(times_ms):
    """Median, quartiles, IQR and minimum (ms) of a list of per-call times."""
    quartiles = statistics.quantiles(times_ms, n=4) if len(times_ms) > 1 else [times_ms[0]] * 3
    return {"median_ms": statistics.median(times_ms), "q1_ms": quartiles[0], "q3_ms": quartiles[2],
            "iqr_ms": quartiles[2] - quartiles[0], "min_ms": min(times_ms), "iters": len(times_ms)}


def _proc_status_bytes(key):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _cpu_peak_memory(fn):
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)     # hand freed heap pages back first
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")                       # VmHWM := VmRSS
        before = _proc_status_bytes("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, _proc_status_bytes("VmHWM") - before)


def peak_memory(fn, device):
    """Extra bytes at the peak of one fn() call (see the module docstring); None if unknown."""
    device = torch.device(device)
    if device.type != "cuda":
        return _cpu_peak_memory(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def saved_tensor_bytes(forward, exclude):
    """Bytes of the distinct storages autograd saves for backward while forward() runs, not
    counting the storages of `exclude` (the layer input and parameters, which exist anyway).
    forward: a grad-mode call returning the output (dropped here, with its graph)."""
    known = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in known:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    del output
    return sum(saved.values())
