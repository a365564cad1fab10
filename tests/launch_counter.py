"""Counting device launches and host reads on CPU (issue 19), for the launch-budget tests.

A TorchDispatchMode counts the aten compute ops (each one a kernel launch on GPU; views,
metadata and allocations are free) and a wrapper around the Triton kernels a backend module
launches counts those (aten ops the interpreter itself runs inside a launch are not counted).
Ops whose schema may alias their input count when they did copy (`.to(dtype)`,
`.contiguous()`). `aten._local_scalar_dense` (`.item()`, `int(t)`, `bool(t)`) is a host read: on GPU a device
sync, and an error under CUDA-graph capture.

Our custom ops are wrappers, not launches: `wrappers` maps an op ("mlan.mm_adapter.default")
to its Python implementation, which the mode runs with itself re-entered, so that what it
launches is counted. (In there composite ops reach the mode undecomposed: `item` and
`is_nonzero` are then the host reads.)
"""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
        "alias", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
        "is_same_size", "_has_compatible_shallow_copy_type", "_local_scalar_dense", "item",
        "is_nonzero", "promote_types"}
HOST_READS = ("_local_scalar_dense", "item", "is_nonzero")


class LaunchCounter(TorchDispatchMode):
    """Counts aten compute ops, Triton launches and host reads while active."""

    def __init__(self, wrappers=None):
        super().__init__()
        self.wrappers = wrappers or {}
        self.aten, self.triton, self.host_reads, self.in_launch = [], [], [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func) in self.wrappers:
            with self:
                return self.wrappers[str(func)](*args, **kwargs)
        result = func(*args, **kwargs)
        if not self.in_launch:
            name = func.overloadpacket.__name__
            if name in HOST_READS:
                self.host_reads.append(args[0])
            elif func.is_view and _copied(result, args):   # .to(dtype), .contiguous(), ...
                self.aten.append(str(func))
            elif not func.is_view and name not in FREE:
                self.aten.append(str(func))
        return result

    @property
    def launches(self):
        return len(self.aten) + len(self.triton)

    def summary(self):
        return (f"{self.launches} launches ({len(self.triton)} triton: {self.triton}; "
                f"{len(self.aten)} aten: {self.aten})")


def _copied(result, args) -> bool:
    """Whether an op whose schema may alias its input (composite `to`, `contiguous`, `reshape`
    reach the mode whole inside the wrappers) made a new tensor, i.e. launched a copy."""
    source = args[0] if args else None
    return (isinstance(result, torch.Tensor) and isinstance(source, torch.Tensor)
            and result.untyped_storage().data_ptr() != source.untyped_storage().data_ptr())


class _CountedKernel:
    """Stands in for a @triton.jit kernel: kernel[grid](...) is counted, then launched."""

    def __init__(self, kernel, box, name):
        self.kernel, self.box, self.name = kernel, box, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            counter = self.box[0]
            if counter is None or counter.in_launch:
                return launch(*args, **kwargs)
            counter.triton.append(self.name)
            counter.in_launch = True
            try:
                return launch(*args, **kwargs)
            finally:
                counter.in_launch = False
        return run


def wrap_kernels(monkeypatch, backend, *kernel_modules):
    """Wrap every kernel of `kernel_modules` that the module `backend` launches; returns the
    box [counter] the wrappers report to (see counting)."""
    box = [None]
    kernels = {name for module in kernel_modules for name, value in vars(module).items()
               if name.endswith("_kernel") and hasattr(value, "__getitem__")}
    wrapped = [name for name in vars(backend) if name in kernels]
    assert wrapped, f"no Triton kernels found in {backend.__name__}"
    for name in wrapped:
        monkeypatch.setattr(backend, name, _CountedKernel(getattr(backend, name), box, name))
    return box


@contextlib.contextmanager
def counting(box, wrappers=None):
    """`with counting(box) as counter:` counts aten ops and the wrapped kernels inside."""
    counter = LaunchCounter(wrappers)
    box[0] = counter
    try:
        with counter:
            yield counter
    finally:
        box[0] = None
