"""What the tests share beyond `mlan_kernels.testing` (re-exported here, so every test imports
its helpers one way: `from helpers import ...`): the oracle's fp64 gradients, which the runtime
toolkit may not compute (the oracle package is test-only), and what is built here.

(tests/conftest.py sets TRITON_INTERPRET=1 without CUDA and provides the `device` fixture.)
"""
import contextlib
import importlib.util

import pytest
import torch

from mlan_kernels import dispatch, mm_adapter
from mlan_kernels.integrations import adapters
from mlan_kernels.reference import mm_adapter_reference
from mlan_kernels.testing import (TEMPERATURE, TOLERANCES, assert_close_to_reference,
                                  assert_verbose_allclose, assert_within_pytorch_error,
                                  explicit_weights, make_adapter_inputs, random_grad,
                                  reference_error)

__all__ = ["BACKENDS", "HAS_KL_CPU", "HAS_TRITON", "TEMPERATURE", "TOLERANCES",
           "assert_close_to_reference", "assert_verbose_allclose", "assert_within_pytorch_error",
           "compiled_backend_built", "default_dtype", "explicit_weights", "grads_of", "make_adapter_inputs", "oracle",
           "random_grad", "randomize_adapters", "reference_error", "run_op", "spy_on_backends"]

HAS_TRITON = importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default float dtype set to `dtype` inside the block, restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _kl_cpu_kernels_built() -> bool:
    from mlan_kernels import dispatch
    return dispatch.unavailable_reason("cpu", torch.device("cpu"), torch.float32, op="kl_div") is None


HAS_KL_CPU = _kl_cpu_kernels_built()      # the compiled extension with the KL kernels loads


def grads_of(fn, inputs, grad_y=None):
    """y = fn(**inputs) (first element if a tuple), then backward of <grad_y, y>.

    Every floating tensor in `inputs` becomes a leaf (a detached alias, so strides are kept).
    Returns (y, {name: grad or None}). grad_y defaults to random_grad in y's dtype.
    """
    leaves = {name: value.detach().requires_grad_(value.is_floating_point())
              if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}
    y = fn(**leaves)
    y = y[0] if isinstance(y, tuple) else y
    grad_y = random_grad(y.shape, y.dtype, y.device) if grad_y is None else grad_y.to(y)
    names = [name for name, value in leaves.items()
             if isinstance(value, torch.Tensor) and value.requires_grad]
    grads = torch.autograd.grad(y, [leaves[name] for name in names], grad_y, allow_unused=True)
    return y.detach(), dict(zip(names, grads))


def oracle(inputs, grad_y=None, **hyper):
    """y and gradients of `mm_adapter_reference` computed in fp64 from the same input values."""
    inputs64 = {name: value.to(torch.float64) if isinstance(value, torch.Tensor) else value
                for name, value in inputs.items()}
    grad_y = None if grad_y is None else grad_y.to(torch.float64)
    return grads_of(lambda **kw: mm_adapter_reference(**kw, **hyper), inputs64, grad_y)


# ---------------------------------------------------------------- the op's backends
def compiled_backend_built(name):
    """Whether the compiled backend `name` ("cpu" | "cuda") is built (mlan_kernels._C)."""
    return dispatch.unavailable_reason(name, torch.device(name), torch.float32) is None


# Every backend of mlan::mm_adapter (parametrize a `backend` fixture with it). The `device`
# fixture is cuda when a GPU is present: the compiled cpu backend runs without one.
BACKENDS = ["reference",
            pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")),
            pytest.param("cpu", marks=pytest.mark.skipif(
                not compiled_backend_built("cpu") or torch.cuda.is_available(),
                reason="mlan_kernels._C not built (or a GPU run)")),
            pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
                not compiled_backend_built("cuda"), reason="mlan_kernels._C built without CUDA")])]


def run_op(backend, inputs, grad_y=None, single_modality=None, **hyper):
    """(y, grads) of mm_adapter on `backend`; fails if the dispatcher would fall back."""
    x = inputs["x"]
    reason = dispatch.unavailable_reason(backend, x.device, x.dtype)
    assert reason is None, f"backend {backend!r} cannot run {x.dtype} on {x.device}: {reason}"
    assert dispatch.select_backend(x.device, x.dtype, backend) == backend
    return grads_of(lambda **kw: mm_adapter(**kw, backend=backend, single_modality=single_modality,
                                            **hyper), inputs, grad_y)


def spy_on_backends(monkeypatch, op, names):
    """A list that receives (backend name, "forward" | "backward") each time one of the named
    backends of `op` ("mm_adapter" | "kl_div") runs."""
    calls = []
    for name in names:
        module = dispatch.get_backend(name, op=op)
        for function in ("forward", "backward"):
            original = getattr(module, function)

            def spy(*args, name=name, function=function, original=original, **kwargs):
                calls.append((name, function))
                return original(*args, **kwargs)
            monkeypatch.setattr(module, function, spy)
    return calls


def randomize_adapters(model, std=0.3, router_std=3.0):
    """Non-zero up-projections and a strong router (routing far from uniform), seeded."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in adapters(model).values():
            for parameter in (adapter.up.weight, adapter.up.bias):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
            adapter.router.weight.copy_(torch.randn(adapter.router.weight.shape, generator=generator) * router_std)
    return model
