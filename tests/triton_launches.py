"""What a GPU checks at every Triton launch and the interpreter does not, checked on a CPU for
every kernel a backend module launches (issue 22).

`check_launches(monkeypatch, backend)` replaces the backend's kernels by `CheckedKernel`s that,
at each `kernel[grid](*args, **kwargs)`:

* check the launch rules: every tensor argument on one device (on a GPU a host buffer is an
  illegal address), the BLOCK* sizes and num_warps powers of two, and PRECISION a dot input
  precision Triton compiles (the compiler refuses the others);
* check every address the kernel reads or writes (bounds checking). The interpreter runs a
  kernel on the tensors' own memory and checks no address: a buffer the host made too small
  is read and written past silently (or the process crashes), and a test may pass on whatever
  lay beyond. Here each masked-on lane of every load and store must fall inside the storage
  of one of the launch's tensor arguments, or inside what the kernel reaches through an
  address table (`indirect`); the first lane outside fails the launch before it is accessed,
  with the kernel's name. (It knows storages, not which argument a pointer came from: an
  access that lands inside another argument's storage passes.)

Tensors on the meta device (a pretend GPU: tensors with a device but no memory) are checked and
recorded but not run. Every launch is recorded in the returned list as a `Launch` (kernel
name, grid, args, kwargs). tests/conftest.py checks every interpreted launch of the three Triton backends.
"""
import collections
import threading

import numpy as np
import torch

Launch = collections.namedtuple("Launch", "name grid args kwargs")

PRECISIONS = ("tf32", "tf32x3", "ieee", "bf16x3", "bf16x6")   # Triton 3.x's CUDA backend
_extents = threading.local()     # the running launch's (name, starts, ends), sorted by start


class CheckedKernel:
    """Stands in for a @triton.jit kernel; see the module docstring."""

    def __init__(self, kernel, name, launches, indirect=None):
        self.kernel, self.name, self.launches, self.indirect = kernel, name, launches, indirect

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.name, grid, args, kwargs))
            tensors = [value for value in (*args, *kwargs.values())
                       if isinstance(value, torch.Tensor)]
            check_launch_rules(self.name, tensors, kwargs)
            if tensors[0].device.type == "meta":
                return None
            if tensors[0].device.type != "cpu":
                return self.kernel[grid](*args, **kwargs)
            extents = [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()
                        + t.untyped_storage().nbytes()) for t in tensors]
            extents += self.indirect(args, kwargs) if self.indirect else []
            extents.sort()
            _extents.current = (self.name, np.array([start for start, _ in extents], np.uint64),
                                np.array([end for _, end in extents], np.uint64))
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                _extents.current = None
        return launch


def check_launch_rules(name, tensors, kwargs):
    """AssertionError naming the kernel when a launch breaks a rule a GPU enforces."""
    devices = {str(tensor.device) for tensor in tensors}
    assert len(devices) == 1, f"{name}: tensor arguments on several devices {sorted(devices)}"
    for key, value in kwargs.items():
        if key.startswith("BLOCK") or key == "num_warps":
            assert isinstance(value, int) and value > 0 and value & (value - 1) == 0, \
                f"{name}: {key}={value!r} is not a power of two"
    if "PRECISION" in kwargs:
        assert str(kwargs["PRECISION"]).lower() in PRECISIONS, \
            f"{name}: PRECISION={kwargs['PRECISION']!r} is not one of {PRECISIONS}"


def _check_addresses(ptrs, mask, access):
    current = getattr(_extents, "current", None)
    if current is None:                           # a launch this module does not check
        return
    name, starts, ends = current
    size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    addresses = np.asarray(ptrs.data, dtype=np.uint64)[np.asarray(mask.data, dtype=bool)]
    index = np.searchsorted(starts, addresses, side="right") - 1
    inside = (index >= 0) & (addresses + np.uint64(size) <= ends[np.maximum(index, 0)])
    if not inside.all():
        raise AssertionError(f"{name} would {access} {int((~inside).sum())} element(s) outside "
                             f"its tensor arguments (first at {hex(int(addresses[~inside][0]))})")


def install_address_checks(monkeypatch):
    """Make the interpreter's loads and stores check their addresses during a CheckedKernel
    launch (until `monkeypatch` undoes it). Every tl.load and tl.store of Triton 3.x's interpreter,
    masked or not, goes through these two builder methods (atomic read-modify-writes do not;
    no kernel here uses them)."""
    from triton.runtime.interpreter import InterpreterBuilder
    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def checked_load(self, ptrs, mask, *rest):
        _check_addresses(ptrs, mask, "read")
        return load(self, ptrs, mask, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        _check_addresses(ptrs, mask, "write")
        return store(self, ptrs, value, mask, *rest)
    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", checked_load)
    monkeypatch.setattr(InterpreterBuilder, "create_masked_store", checked_store)


def address_table_extents(args, kwargs):
    """What grad_scale_kernels reach through their address table (args 0 and 1): address[i]
    holds numel[i] elements of DTYPE."""
    size = kwargs["DTYPE"].primitive_bitwidth // 8
    return [(address, address + numel * size)
            for address, numel in zip(args[0].tolist(), args[1].tolist())]


def check_launches(monkeypatch, backend, indirect=None) -> list:
    """Replace every Triton kernel the module `backend` launches by a CheckedKernel; returns the
    list the launches are recorded in. indirect(args, kwargs): [(start, end)] address ranges a
    kernel reaches besides its tensor arguments."""
    launches = []
    kernels = [name for name, value in vars(backend).items()
               if name.endswith("_kernel") and hasattr(value, "__getitem__")]
    assert kernels, f"no Triton kernels found in {backend.__name__}"
    for name in kernels:
        monkeypatch.setattr(backend, name, CheckedKernel(getattr(backend, name), name, launches,
                                                         indirect))
    return launches


def pretend_gpu(monkeypatch, multiprocessors):
    """Make the three Triton backends believe they run on a GPU with `multiprocessors` SMs: they
    pick its launch configuration (the interpreter still runs CPU tensors)."""
    from mlan_kernels.backends import grad_scale_triton, kl_triton, triton as mm_adapter_triton
    for backend in (mm_adapter_triton, kl_triton, grad_scale_triton):
        monkeypatch.setattr(backend, "interpreted", lambda device: False)
    monkeypatch.setattr(mm_adapter_triton, "_sm_count", lambda index: multiprocessors)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
