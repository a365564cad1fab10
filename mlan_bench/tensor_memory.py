"""Peak bytes of live tensor storage on any device: a CPU stand-in for torch.cuda.max_memory_allocated.

    with TensorMemory() as memory:
        loss = f(x); loss.backward()
    memory.peak_bytes, memory.live_bytes, memory.largest_bytes

While active, every op that allocates (not views, not in-place or out= ops, whose returns alias
an input per the op schema, and not ops that return a storage already counted, such as
aten._unsafe_view) adds its outputs' storage bytes to `live_bytes`; a finalizer on the
storage subtracts them when it is freed (by Python or by autograd releasing a saved tensor), and
`peak_bytes` is the highest `live_bytes` seen. Storages allocated before entering are not counted.
What it cannot see: temporaries allocated and freed inside one op's kernel (a C++ or CUDA
workspace), and storages grown by resize_. Unlike the process's resident set it does not depend
on the C allocator keeping freed pages.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class TensorMemory(TorchDispatchMode):
    """Counts live/peak/largest bytes of the tensor storages allocated by ops while active."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0
        self._counted = set()            # data_ptr of the storages counted and still alive

    def _release(self, pointer, nbytes):
        self._counted.discard(pointer)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        values = out if isinstance(out, (tuple, list)) else (out,)
        for schema_return, value in zip(func._schema.returns, values):
            if not isinstance(value, torch.Tensor) or schema_return.alias_info is not None:
                continue
            storage = value.untyped_storage()
            pointer, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or pointer in self._counted:     # e.g. aten._unsafe_view of a result
                continue
            self._counted.add(pointer)
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self.largest_bytes = max(self.largest_bytes, nbytes)
            weakref.finalize(storage, self._release, pointer, nbytes)
        return out


def tensor_peak_bytes(fn):
    """Peak live bytes of tensor storage allocated during one fn() call (see TensorMemory)."""
    with TensorMemory() as memory:
        fn()
    return memory.peak_bytes
