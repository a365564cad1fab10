"""Per-group gradient norm, clipping and multiplier in a few multi-tensor launches.

    norms = scale_grads_(groups, multipliers, max_norm=None)
For group i: norm_i = ‖all grads of group i‖₂ (fp32), clip_i = min(1, max_norm / (norm_i + eps)),
every grad of the group *= multipliers[i] · clip_i, in place. Returns the pre-scaling norms [G].
The oracle is mlan_kernels.reference.scale_grads_reference (a Python loop over parameters).

Backends (registry: mlan_kernels.dispatch, op "grad_scale"): "foreach" (backends/
grad_scale_foreach.py; the default, CPU and GPU: "auto" means it until GPU measurements say
otherwise) and "triton" (backends/grad_scale_triton.py: two multi-tensor launches per dtype
for all groups together). The only per-parameter Python work is collecting `.grad`.

For SGD-family optimizers and per-group clipping only: Adam/AdamW ignore a constant gradient
scale per tensor, so balance multipliers for them go through the LR (training/scheduler.py).
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import dispatch


def _collect(groups):
    """Per group, the .grad of every parameter that has one."""
    return [[param.grad for param in params if param.grad is not None] for params in groups]


def _check(groups, multipliers, max_norm):
    if isinstance(groups, Tensor) or not isinstance(groups, Sequence):
        raise TypeError("groups must be a sequence of parameter sequences")
    if len(multipliers) != len(groups):
        raise ValueError(f"multipliers must have one value per group ({len(groups)}), got {len(multipliers)}")
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0 or None, got {max_norm!r}")


@torch.no_grad()
def scale_grads_(groups: Sequence[Sequence[Tensor]], multipliers: Sequence[float],
                 max_norm: Optional[float] = None, eps: float = 1e-6, backend: str = "auto") -> Tensor:
    """Scale every group's gradients in place by multiplier · clip factor; see module doc.

    groups: G sequences of parameters (their `.grad` is used; parameters without one are
    skipped; all grads on one device); multipliers: G floats; max_norm: per-group clip threshold or
    None; backend: "auto" (env MLAN_GRAD_SCALE_BACKEND, else "foreach") | "foreach" | "triton".
    Returns the per-group gradient norms before scaling: [G] fp32 on the grads' device.
    """
    _check(groups, multipliers, max_norm)
    dispatch.check_name(backend, op="grad_scale")
    per_group = _collect(groups)
    grads = [grad for group in per_group for grad in group]
    if not grads:
        return torch.zeros(len(groups), dtype=torch.float32)
    name = dispatch.select_backend(grads[0].device, grads[0].dtype, backend, op="grad_scale")
    return dispatch.get_backend(name, op="grad_scale").scale_grads(per_group, multipliers,
                                                                   max_norm, eps)
