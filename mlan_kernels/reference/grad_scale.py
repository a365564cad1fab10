"""Per-group gradient scaling in plain torch: the oracle of ops/grad_scale.py (a Python loop
over the parameters, one at a time)."""
from typing import Optional, Sequence

import torch
from torch import Tensor


def scale_grads_reference(groups: Sequence[Sequence[Tensor]], multipliers: Sequence[float],
                          max_norm: Optional[float] = None, eps: float = 1e-6) -> Tensor:
    """Per-group gradient norm, clip and multiplier, one parameter at a time (the slow loop).

    For group i with grads g (parameters without .grad are skipped):
        norm_i = ‖concat(g)‖₂ (fp32)
        clip_i = min(1, max_norm / (norm_i + eps))   (1 when max_norm is None)
        g     *= multipliers[i] · clip_i               in place
    Returns the pre-scaling norms [G] (fp32).
    """
    norms = []
    for params, multiplier in zip(groups, multipliers):
        squares = torch.zeros((), dtype=torch.float32)
        for param in params:
            if param.grad is not None:
                squares = squares + param.grad.detach().float().pow(2).sum().cpu()
        norm = squares.sqrt()
        clip = 1.0 if max_norm is None else min(1.0, max_norm / (float(norm) + eps))
        for param in params:
            if param.grad is not None:
                param.grad.mul_(multiplier * clip)
        norms.append(norm)
    return torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float32)
