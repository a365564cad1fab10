"""Argument checks for the MM-Adapter op: every error names the argument and what was expected."""
import math

import torch

from ..config import MAX_ABS_SCALE, TEMPERATURE_RANGE

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PARAMETER_DTYPES = ACTIVATION_DTYPES


def _check_tensor(name, value, ndim, dtypes, optional=False):
    if value is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; expected one of {allowed}")


def _check_shape(name, value, expected):
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(value.shape)}")


def check_single_modality(value):
    """single_modality must be exactly None, True or False (a truthy string is not a promise)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"single_modality must be None, True or False, got {value!r}")


def validate_mm_adapter_args(x, down_weight, down_bias, up_weight, up_bias, router_weight,
                             router_bias, weights, scale, temperature, dropout_p, groups,
                             single_modality=None):
    """Raise ValueError/TypeError naming the first bad argument. Returns (B, L, D, r, E)."""
    check_single_modality(single_modality)
    _check_tensor("x", x, 3, ACTIVATION_DTYPES)
    _check_tensor("down_weight", down_weight, 2, PARAMETER_DTYPES)
    _check_tensor("down_bias", down_bias, 1, PARAMETER_DTYPES)
    _check_tensor("up_weight", up_weight, 3, PARAMETER_DTYPES)
    _check_tensor("up_bias", up_bias, 2, PARAMETER_DTYPES)
    _check_tensor("router_weight", router_weight, 2, PARAMETER_DTYPES, optional=weights is not None)
    _check_tensor("router_bias", router_bias, 1, PARAMETER_DTYPES, optional=weights is not None)
    _check_tensor("weights", weights, 2, (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                  optional=True)

    batch, length, dim = x.shape
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    rank = down_weight.shape[0]
    experts = up_weight.shape[0]
    if rank < 1:
        raise ValueError(f"down_weight must be [r, D] with r >= 1, got shape {list(down_weight.shape)}")
    _check_shape("down_weight", down_weight, (rank, dim))
    _check_shape("down_bias", down_bias, (rank,))
    if rank % groups != 0:
        raise ValueError(f"groups={groups} must divide the rank r={rank} (down_weight.shape[0])")
    if dim % groups != 0:
        raise ValueError(f"groups={groups} must divide the hidden size D={dim} (x.shape[-1])")
    if experts < 1:
        raise ValueError(f"up_weight must be [E, D, r/g] with E >= 1 experts, got shape {list(up_weight.shape)}")
    _check_shape("up_weight", up_weight, (experts, dim, rank // groups))
    _check_shape("up_bias", up_bias, (experts, dim))
    if weights is None:
        _check_shape("router_weight", router_weight, (experts, dim))
        _check_shape("router_bias", router_bias, (experts,))
    else:
        _check_shape("weights", weights, (batch, experts))
        # The value checks read values: skipped while compiling and on GPU (no device sync per call).
        if weights.numel() and not torch.compiler.is_compiling() and weights.device.type == "cpu":
            values = weights.detach().float()
            if not bool((values >= 0).all()):      # also false for nan
                raise ValueError("weights must be routing weights: non-negative (and not nan), "
                                 "summing to 1 over the last (expert) dimension")
            if not torch.allclose(values.sum(-1), torch.ones(batch), atol=1e-3):
                raise ValueError("weights must be routing weights summing to 1 over the last "
                                 "(expert) dimension")

    for name, value in (("scale", scale), ("temperature", temperature), ("dropout_p", dropout_p)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite float, got {value!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    low, high = TEMPERATURE_RANGE
    if not low <= temperature <= high:
        raise ValueError(f"temperature must be in [{low:g}, {high:g}] (fp32 router logits overflow "
                         f"outside), got {temperature}")
    if abs(scale) > MAX_ABS_SCALE:
        raise ValueError(f"scale must be at most {MAX_ABS_SCALE:g} in magnitude (fp32 outputs "
                         f"overflow beyond), got {scale}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if batch * length * rank >= 2**31:
        raise ValueError(f"x has too many tokens for the dropout counter: B*L*r must be < 2^31, "
                         f"got {batch}*{length}*{rank}")

    tensors = {"x": x, "down_weight": down_weight, "down_bias": down_bias, "up_weight": up_weight,
               "up_bias": up_bias, "router_weight": router_weight, "router_bias": router_bias,
               "weights": weights}
    for name, value in tensors.items():
        if value is not None and value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}; "
                             f"all tensors must be on the same device")
    return batch, length, dim, rank, experts


def check_seed(seed):
    """TypeError unless the dropout seed is None, a Python int in int64's range, or an integer
    tensor of one element (a float would be truncated, a longer tensor read as its first
    element by one backend and refused with a shape error by another)."""
    if seed is None:
        return
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dim() > 1 or seed.is_floating_point() or seed.is_complex() \
                or seed.dtype == torch.bool:
            raise TypeError(f"seed must be an int or a one-element integer tensor, got a "
                            f"{seed.dtype} tensor of shape {list(seed.shape)}")
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a one-element integer tensor, got {seed!r}")
    if not -2**63 <= seed < 2**63:
        raise TypeError(f"seed must fit in int64, got {seed}")
