"""Shared test inputs and gradient helpers for the MM-Adapter tests.

(tests/conftest.py sets TRITON_INTERPRET=1 without CUDA and provides the `device` fixture.)
"""
import importlib.util

import torch

from mlan_kernels.reference import mm_adapter_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _kl_cpu_kernels_built() -> bool:
    from mlan_kernels import dispatch
    return dispatch.unavailable_reason("cpu", torch.device("cpu"), torch.float32, op="kl_div") is None


HAS_KL_CPU = _kl_cpu_kernels_built()      # the compiled extension with the KL kernels loads
TEMPERATURE = 10.0          # the op's default router temperature
ROUTER_LOGIT_STD = 2.0      # std of router logits / TEMPERATURE: routing far from uniform
PARAM_NAMES = ("down_weight", "down_bias", "up_weight", "up_bias", "router_weight", "router_bias")


def make_adapter_inputs(B, L, D, r, E, g, dtype, device, param_dtype=None, seed=0,
                        nonzero=True):
    """Random x [B, L, D] (dtype) and adapter parameters (param_dtype, default dtype).

    nonzero=False zeroes the up-projection (LaVIN's init: the adapter is the identity);
    the same seed draws the same x either way.
    """
    generator = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def randn(*shape, std=1.0, dtype=param_dtype):
        values = torch.randn(*shape, generator=generator, dtype=torch.float64) * std
        return values.to(device=device, dtype=dtype)

    up_weight = randn(E, D, r // g, std=(g / r) ** 0.5)
    up_bias = randn(E, D, std=0.1)
    inputs = dict(
        x=randn(B, L, D, dtype=dtype),
        down_weight=randn(r, D, std=D ** -0.5),
        down_bias=randn(r, std=0.1),
        up_weight=up_weight if nonzero else torch.zeros_like(up_weight),
        up_bias=up_bias if nonzero else torch.zeros_like(up_bias),
        router_weight=randn(E, D, std=ROUTER_LOGIT_STD * TEMPERATURE / D ** 0.5),
        router_bias=randn(E),
    )
    return inputs


def explicit_weights(B, E, dtype, device, seed=1):
    """Random routing weights [B, E] (rows sum to 1), far from uniform."""
    logits = torch.randn(B, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.softmax(2.0 * logits, dim=-1).to(device=device, dtype=dtype)


def random_grad(shape, dtype, device, seed=1):
    """A fixed random output gradient (same values for every caller with the same seed/dtype)."""
    values = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return values.to(device=device, dtype=dtype)


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
