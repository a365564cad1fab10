"""How much memory one callable uses. (Its time: `mlan_kernels.testing.measure`, the one timer
of the tests, the benchmarks, the demo and the trainer; on CPU the thread count in use,
torch.get_num_threads, goes into the run's environment, report.py.)

peak_memory: extra bytes at the peak of one call. CUDA: torch.cuda.max_memory_allocated minus
  the bytes allocated before. CPU (Linux): growth of the process's peak resident set (VmHWM,
  reset through /proc/self/clear_refs after malloc_trim) over its resident set before the call
  — a proxy that sees every allocation, C++ temporaries and compiled code included; None where
  /proc is not writable.
saved_tensor_bytes: bytes autograd keeps for backward, from saved_tensors_hooks.
"""
import ctypes

import torch


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
