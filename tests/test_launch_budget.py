"""Launch budget of the MM-Adapter's Triton path (issue 19): how many device launches one
forward+backward costs, and that it never synchronises with the host.

A TorchDispatchMode counts the aten compute ops (each one a kernel launch on GPU; views,
metadata and allocations are free) and a wrapper around the Triton kernels of
mlan_kernels.backends.triton counts their launches (aten ops the interpreter itself runs
inside a launch are not counted). `aten._local_scalar_dense` (`.item()`, `int(t)`,
`bool(t)`) is a host read: on GPU a device sync, and an error under CUDA-graph capture. None
is allowed (the dropout seed is an int64 tensor on x's device that the kernels read).
Results are checked too: against the fp64 oracle, and for single_modality=True (sample 0
routes every sample, so its gradients differ from the oracle's by construction) against the
reference backend taking the same path.
"""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (HAS_TRITON, assert_close_to_reference, grads_of, make_adapter_inputs, oracle,
                     random_grad)
from mlan_kernels import mm_adapter

_OP_MODULE = importlib.import_module("mlan_kernels.ops.mm_adapter")
# Our custom ops are wrappers, not launches: the mode runs their Python implementation with
# itself re-entered, so that what they launch is counted. (In there composite ops reach the
# mode undecomposed: `item` and `is_nonzero` are then the host reads.)
_WRAPPERS = {"mlan.mm_adapter.default": _OP_MODULE._forward_impl,
             "mlan.mm_adapter_backward.default": _OP_MODULE._backward_impl}
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="no triton")

# Device launches per forward+backward on the Triton path, measured by this test: 31-35 (fp32)
# and 43-47 (fp16: casts) before issue 19, 8 at its first step (router, weight slots, forward;
# weight slots again, passes A, B, C, router backward). Now 5 in every case: prep (weight slots
# + router), forward; passes A, B, C (C with the softmax + router backward), the slots saved.
LAUNCH_BUDGET = 5

_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
         "alias", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
         "is_same_size", "_has_compatible_shallow_copy_type", "_local_scalar_dense", "item",
         "is_nonzero", "promote_types"}
_HOST_READS = ("_local_scalar_dense", "item", "is_nonzero")   # int(t) / bool(t) (see _WRAPPERS)


class LaunchCounter(TorchDispatchMode):
    """Counts aten compute ops, Triton launches and host reads while active."""

    def __init__(self):
        super().__init__()
        self.aten, self.triton, self.host_reads, self.in_launch = [], [], [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func) in _WRAPPERS:
            with self:
                return _WRAPPERS[str(func)](*args, **kwargs)
        if not self.in_launch:
            name = func.overloadpacket.__name__
            if name in _HOST_READS:
                self.host_reads.append(args[0])
            elif not func.is_view and name not in _FREE:
                self.aten.append(str(func))
        return func(*args, **kwargs)

    @property
    def launches(self):
        return len(self.aten) + len(self.triton)


class _CountedKernel:
    """Stands in for a @triton.jit kernel: kernel[grid](...) is counted, then launched."""

    def __init__(self, kernel, counter_box, name):
        self.kernel, self.box, self.name = kernel, counter_box, name

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


@pytest.fixture
def counted(monkeypatch):
    """A box holding the active LaunchCounter; every kernel the backend module launches is wrapped."""
    import mlan_kernels.backends.triton as backend
    from mlan_kernels.triton import mm_adapter_kernels, mm_adapter_weight_kernels
    box = [None]
    kernels = {name for module in (mm_adapter_kernels, mm_adapter_weight_kernels)
               for name, value in vars(module).items()
               if name.endswith("_kernel") and hasattr(value, "__getitem__")}
    wrapped = [name for name in vars(backend) if name in kernels]
    assert wrapped, "no Triton kernels found in the backend module"
    for name in wrapped:
        monkeypatch.setattr(backend, name, _CountedKernel(getattr(backend, name), box, name))
    return box


def _run(box, inputs, grad_y, backend, **hyper):
    counter = LaunchCounter()
    leaves = {name: value.detach().requires_grad_(value.is_floating_point())
              for name, value in inputs.items()}
    names = list(leaves)
    box[0] = counter
    try:
        with counter:
            y = mm_adapter(**leaves, backend=backend, **hyper)
            grads = torch.autograd.grad(y, [leaves[n] for n in names], grad_y, allow_unused=True)
    finally:
        box[0] = None
    return counter, y.detach(), dict(zip(names, grads))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("single_modality", [True, False], ids=["single", "general"])
@pytest.mark.parametrize("experts", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_launches_and_host_syncs_per_forward_backward(counted, dtype, experts, single_modality,
                                                      dropout_p, request):
    B, L, D, r, g = 3, 5, 64, 8, 2
    inputs = make_adapter_inputs(B, L, D, r, experts, g, dtype, "cpu", single_modality=single_modality)
    grad_y = random_grad((B, L, D), dtype, "cpu")
    hyper = dict(groups=g, dropout_p=dropout_p, seed=7, single_modality=single_modality)
    counter, y, grads = _run(counted, inputs, grad_y, "triton", **hyper)

    assert not counter.host_reads, "a host read (device sync) in forward/backward"
    print(f"\n{request.node.callspec.id}: {counter.launches} launches "
          f"({len(counter.triton)} triton: {counter.triton}; {len(counter.aten)} aten: {counter.aten})")
    assert counter.launches <= LAUNCH_BUDGET, (counter.triton, counter.aten)

    if single_modality:     # gradients follow sample 0's routing: compare with the reference path
        expected_y, expected = grads_of(
            lambda **kw: mm_adapter(**kw, backend="reference", **hyper),
            {k: v.double() for k, v in inputs.items()}, grad_y.double())
    else:
        expected_y, expected = oracle(inputs, grad_y, groups=g, dropout_p=dropout_p, seed=7)
    assert_close_to_reference(y, expected_y, dtype, "y")
    for name, value in expected.items():
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close_to_reference(grads[name], value, dtype, name)


def test_single_modality_detection_is_the_only_sync(counted):
    """single_modality=None detects equal routing tokens: one host read, then the same launches."""
    inputs = make_adapter_inputs(3, 5, 64, 8, 2, 2, torch.float32, "cpu")
    grad_y = random_grad((3, 5, 64), torch.float32, "cpu")
    counter, _, _ = _run(counted, inputs, grad_y, "triton", groups=2, single_modality=None)
    assert len(counter.host_reads) == 1
