"""Grad-scaling backend "foreach" (the default, CPU and GPU): torch._foreach_norm over all grads
(multi-tensor launches per (device, dtype) bucket), then per group: the norm of its per-tensor
norms, the clip factor as a 0-d device tensor, and one torch._foreach_mul_. No value is copied
between host and device (no sync). Contract: mlan_kernels.dispatch."""
import functools

import torch


def scale_grads(per_group, multipliers, max_norm, eps):
    """Scale each group's grads (per_group: G lists of grad tensors) in place; norms [G] fp32."""
    grads = [grad for group in per_group for grad in group]
    # L2 norms accumulated in fp32 even for 16-bit grads; in fp64 when a grad is fp64
    accumulate = functools.reduce(torch.promote_types, {grad.dtype for grad in grads}, torch.float32)
    norms = torch._foreach_norm(grads, dtype=accumulate)
    group_norms, start = [], 0
    for group, multiplier in zip(per_group, multipliers):
        if not group:
            group_norms.append(norms[0].new_zeros(()))
            continue
        norm = torch.linalg.vector_norm(torch.stack(norms[start:start + len(group)]))
        start += len(group)
        # a 0-d tensor, not a Python float: foreach then multiplies 16-bit grads in fp32, as
        # mul_ does (with a float it rounds the multiplier to the grads' dtype first)
        factor = norm.new_full((), float(multiplier))
        if max_norm is not None:
            factor = factor * (max_norm / (norm + eps)).clamp(max=1.0)
        torch._foreach_mul_(group, factor)
        group_norms.append(norm)
    return torch.stack(group_norms).float()
