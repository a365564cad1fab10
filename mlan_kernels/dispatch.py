"""The one backend registry of every op: which backends exist, which can run, which runs.

An op's backends are modules with the same functions (the op's contract):
    mm_adapter   forward(x, down_weight, down_bias, up_weight, up_bias, routing_weights, scale,
                         dropout_p, seed, groups, single_modality) -> (y, h)
                 (routing_weights [B, E] and h in compute_dtype(x.dtype), fp32 or fp64)
                 backward(grad_y, x, h, routing_weights, down_weight, down_bias, up_weight,
                          up_bias, scale, dropout_p, seed, groups) -> (grad_x, grad_down_weight,
                          grad_down_bias, grad_up_weight, grad_up_bias, grad_routing_weights)
                 or, the router fused in (triton; see ops/mm_adapter.py):
                 forward_routed(x, down_weight, down_bias, up_weight, up_bias, router_weight,
                                router_bias, weights, scale, temperature, dropout_p, seed, groups,
                                single_modality, by_first) -> (y, h, routing_weights, saved)
                 backward_routed(grad_y, grad_routing_weights, x, h, routing_weights, saved,
                                 down_weight, down_bias, up_weight, up_bias, router_weight,
                                 weights, scale, temperature, dropout_p, seed, groups, by_first)
                 -> (grad_x, ..., grad_up_bias, [routing gradients])
                 saved_slots_shape(dim, rank, experts, dtype) -> the shape of `saved` (fakes)
                 seed: int or int64 scalar tensor (None without dropout).
    kl_div       forward(logits_p, logits_q, mask) -> (kl, lse_p, lse_q)
                 backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, inplace=False)
                 -> (grad_logits_p, grad_logits_q)         (fused_linear_kl uses these too)
    grad_scale   scale_grads(per_group, multipliers, max_norm, eps) -> norms [G]
and may define supports(name, device, dtype) -> None | reason, for what the entry cannot say.

`backend="auto"` (the default argument of every op) reads the op's environment variable
(MLAN_BACKEND for the MM-Adapter, MLAN_KL_BACKEND, MLAN_GRAD_SCALE_BACKEND), then takes the
op's preferred backends for the device type in order, then its fallback (plain torch, runs
everything). A requested or preferred backend that cannot run falls back with one warning
saying why (none for float64 under "auto": the fallback is its only path by design).
Adding a backend: one `Backend(...)` row below and one module in mlan_kernels/backends/.
"""
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .utils import reset_warnings, triton_interpreter, warn_once

DEVICE_TYPES = ("cpu", "cuda")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Op:
    """An op's backend policy: env override, preferred backends per device type, fallback."""
    name: str
    label: str                      # how messages call the op
    env: str
    fallback: str
    preferred: tuple = ()           # ((device type, (backend, ...)), ...)

    def __post_init__(self):
        for device_type, names in self.preferred:
            if device_type not in DEVICE_TYPES or not isinstance(names, tuple):
                raise ValueError(f"preferred must be ((device type, (backend, ...)), ...) with a "
                                 f"device type in {DEVICE_TYPES}, got {self.preferred!r}")


@dataclass(frozen=True)
class Backend:
    """One backend of one op. devices=None: any device (plain torch); interpretable: also runs
    CPU tensors under TRITON_INTERPRET=1 (the Triton backends, for tests)."""
    op: str
    name: str
    module: str                     # import path of the module with the op's functions
    devices: Optional[tuple] = None
    dtypes: tuple = _FLOATS + (torch.float64,)
    interpretable: bool = False

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {tuple(OPS)}, got {self.op!r}")
        if not self.name.isidentifier() or self.name == "auto":
            raise ValueError(f"name must be an identifier other than 'auto', got {self.name!r}")
        if not self.module.startswith("mlan_kernels.backends."):
            raise ValueError(f"module must be a module of mlan_kernels.backends, got {self.module!r}")
        if self.devices is not None and not set(self.devices) <= set(DEVICE_TYPES):
            raise ValueError(f"devices must be None or a tuple of {DEVICE_TYPES}, got {self.devices!r}")
        if not self.dtypes or not all(isinstance(dtype, torch.dtype) for dtype in self.dtypes):
            raise ValueError(f"dtypes must be a non-empty tuple of torch dtypes, got {self.dtypes!r}")


OPS = {op.name: op for op in (
    Op("mm_adapter", "MM-Adapter", "MLAN_BACKEND", "reference",
       (("cuda", ("triton", "cuda")), ("cpu", ("cpu",)))),
    Op("kl_div", "KL", "MLAN_KL_BACKEND", "chunked", (("cuda", ("triton",)), ("cpu", ("cpu",)))),
    Op("grad_scale", "grad scaling", "MLAN_GRAD_SCALE_BACKEND", "foreach"),
)}

_BACKENDS = {}


def register(backend: Backend) -> Backend:
    """Add `backend` to the registry (its op's names must stay unique)."""
    key = (backend.op, backend.name)
    if key in _BACKENDS:
        raise ValueError(f"{backend.op} backend {backend.name!r} is already registered")
    _BACKENDS[key] = backend
    return backend


for _entry in (
        Backend("mm_adapter", "reference", "mlan_kernels.backends.plain_torch"),
        Backend("mm_adapter", "triton", "mlan_kernels.backends.triton", ("cuda",), _FLOATS, True),
        Backend("mm_adapter", "cuda", "mlan_kernels.backends.compiled", ("cuda",), _FLOATS),
        Backend("mm_adapter", "cpu", "mlan_kernels.backends.compiled", ("cpu",), _FLOATS),
        Backend("kl_div", "triton", "mlan_kernels.backends.kl_triton", ("cuda",), _FLOATS, True),
        Backend("kl_div", "cpu", "mlan_kernels.backends.kl_compiled", ("cpu",), _FLOATS),
        Backend("kl_div", "chunked", "mlan_kernels.backends.kl_chunked"),
        Backend("grad_scale", "foreach", "mlan_kernels.backends.grad_scale_foreach"),
        Backend("grad_scale", "triton", "mlan_kernels.backends.grad_scale_triton", ("cuda",),
                _FLOATS, True)):
    register(_entry)


def names(op: str = "mm_adapter") -> tuple:
    """The registered backend names of `op`, in registration order."""
    return tuple(name for (owner, name) in _BACKENDS if owner == op)


BACKENDS = names("mm_adapter")      # ("reference", "triton", "cuda", "cpu")


def _op(op: str) -> Op:
    if op not in OPS:
        raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}")
    return OPS[op]


@functools.lru_cache(maxsize=None)
def _load(module: str):
    """Import a backend module; returns (module, None) or (None, reason)."""
    try:
        return importlib.import_module(module), None
    except ImportError as error:  # triton or the compiled extension missing
        return None, str(error)


def check_name(requested: str, op: str = "mm_adapter") -> None:
    """Raise ValueError naming the registered backends unless `requested` is one or "auto"."""
    if requested != "auto" and (op, requested) not in _BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + names(op)}, got {requested!r} "
                         f"(argument `backend` or env {_op(op).env})")


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype,
                       op: str = "mm_adapter") -> Optional[str]:
    """Why backend `name` of `op` cannot run tensors of this device/dtype (None when it can)."""
    check_name(name, op)
    entry = _BACKENDS[(op, name)]
    if dtype not in entry.dtypes:
        return f"{name} {_op(op).label} supports {entry.dtypes}, got {dtype}"
    if entry.devices is not None and device.type not in entry.devices:
        if entry.interpretable and device.type == "cpu":
            if not triton_interpreter():
                return f"{name} needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing)"
        else:
            return f"the {name} backend needs {'/'.join(d.upper() for d in entry.devices)} tensors"
    module, error = _load(entry.module)
    if module is None:
        return f"backend {name!r} could not be imported ({error})"
    supports = getattr(module, "supports", None)
    return supports(name, device, dtype) if supports else None


def select_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto",
                   op: str = "mm_adapter") -> str:
    """Name of the backend of `op` that will run tensors on `device` with `dtype`."""
    spec = _op(op)
    if requested == "auto":
        requested = os.environ.get(spec.env) or "auto"           # unset or empty: auto
    check_name(requested, op)
    wanted = [requested] if requested != "auto" else dict(spec.preferred).get(device.type, ())
    for name in wanted:
        reason = unavailable_reason(name, device, dtype, op)
        if reason is None:
            return name
        if requested != "auto" or dtype != torch.float64:
            warn_once(f"mlan_kernels: {spec.label} backend {name!r} unavailable: {reason}; "
                      f"using {spec.fallback!r}")
    return spec.fallback


def get_backend(name: str, op: str = "mm_adapter"):
    """The module of backend `name` of `op` (must be importable)."""
    check_name(name, op)
    module, error = _load(_BACKENDS[(op, name)].module)
    if module is None:
        raise RuntimeError(f"mlan_kernels backend {name!r} is not available: {error}")
    return module


def _check_policies():
    """Every op's fallback and preferred backends are registered (checked at import)."""
    for spec in OPS.values():
        for name in (spec.fallback,) + tuple(n for _, group in spec.preferred for n in group):
            if (spec.name, name) not in _BACKENDS:
                raise ValueError(f"{spec.name}: backend {name!r} is named but not registered")


_check_policies()
__all__ = ["Op", "Backend", "OPS", "BACKENDS", "register", "names", "check_name",
           "unavailable_reason", "select_backend", "get_backend", "reset_warnings",
           "triton_interpreter", "warn_once"]
