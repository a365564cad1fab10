"""Backend choice for the MM-Adapter op, in one place.

A backend is a module with the same two functions (see backends/reference.py):
    forward(x, down_weight, down_bias, up_weight, up_bias, routing_weights, scale,
            dropout_p, seed, groups, single_modality) -> (y, h)
    backward(grad_y, x, h, routing_weights, down_weight, down_bias, up_weight, up_bias,
             scale, dropout_p, seed, groups) -> (grad_x, grad_down_weight, grad_down_bias,
                                                 grad_up_weight, grad_up_bias, grad_routing_weights)
`MLAN_BACKEND=reference|triton|cuda|cpu` forces one; a forced or preferred backend that
cannot run falls back to `reference` with one warning per (backend, reason).
"""
import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")
_MODULES = {"reference": "mlan_kernels.backends.reference",
            "triton": "mlan_kernels.backends.triton",
            "cuda": "mlan_kernels.backends.compiled",
            "cpu": "mlan_kernels.backends.compiled"}
# Fused backends tried in order, per device type, when no backend is forced.
PREFERRED = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
_warned = set()


def warn_once(message, registry=None):
    """Issue `message` as a RuntimeWarning once per registry (default: the adapter dispatcher's)."""
    registry = _warned if registry is None else registry
    if message not in registry:
        registry.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _load(name):
    """Import a backend module; returns (module, None) or (None, reason)."""
    try:
        return importlib.import_module(_MODULES[name]), None
    except ImportError as error:  # triton or the compiled extension missing
        return None, str(error)


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype):
    """Why backend `name` cannot run tensors of this device/dtype (None when it can)."""
    if name == "reference":
        return None
    if dtype == torch.float64:
        return "float64 is supported by the reference backend only"
    if name == "triton" and device.type != "cuda" and not triton_interpreter():
        return "triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing)"
    if name == "cuda" and device.type != "cuda":
        return "the cuda backend needs CUDA tensors"
    if name == "cpu" and device.type != "cpu":
        return "the cpu backend needs CPU tensors"
    module, error = _load(name)
    if module is None:
        return f"backend {name!r} could not be imported ({error})"
    supported = getattr(module, "supports", None)
    return supported(name, device, dtype) if supported else None


def select_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """Name of the backend that will run the op for tensors on `device` with `dtype`."""
    if requested == "auto":
        requested = os.environ.get("MLAN_BACKEND", "auto") or "auto"
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r} "
                             f"(argument `backend` or env MLAN_BACKEND)")
        reason = unavailable_reason(requested, device, dtype)
        if reason is None:
            return requested
        warn_once(f"mlan_kernels: backend {requested!r} unavailable: {reason}; using 'reference'")
        return "reference"
    for name in PREFERRED.get(device.type, ()):
        reason = unavailable_reason(name, device, dtype)
        if reason is None:
            return name
        if dtype != torch.float64:
            warn_once(f"mlan_kernels: fused backend {name!r} unavailable: {reason}; "
                       f"falling back to the slower 'reference' backend")
    return "reference"


def get_backend(name: str):
    """The backend module called `name` (must be importable)."""
    module, error = _load(name)
    if module is None:
        raise RuntimeError(f"mlan_kernels backend {name!r} is not available: {error}")
    return module
