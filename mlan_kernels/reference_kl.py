"""KL divergence between rows of logits, and per-group gradient scaling, in plain torch: the
oracle the fused KL kernels (ops/kl_div.py) and grad scaling (ops/grad_scale.py) are tested
against. Gradients of this file come from autograd.

Notation: logits_p, logits_q [T, V] (T rows = tokens, V = vocabulary), any float dtype,
computed in fp32 (fp64 stays fp64):
    log p = log_softmax(logits_p),  log q = log_softmax(logits_q)
    KL_t  = Σ_v p_v (log p_v − log q_v)              per row, [T]
An entry with logits_p = −inf has p_v = 0 and contributes 0 (0·log 0 = 0), whatever q_v is.
An entry with logits_q = −inf where p_v > 0 makes KL_t = +inf (the math, not an error).

Reductions over rows selected by `mask` [T] (bool; None = all rows):
    "none"      -> [T], 0 on unselected rows
    "sum"       -> Σ_selected KL_t
    "batchmean" -> Σ_selected KL_t / max(#selected, 1)   (mean per token, like F.kl_div's
                   "batchmean" for an unmasked [T, V] input)
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from .reference import compute_dtype  # KL accumulates at >= fp32, like the adapter

REDUCTIONS = ("batchmean", "sum", "none")


def kl_rows_reference(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p‖q) per row: logits [T, V] -> [T] in compute_dtype(logits_p.dtype)."""
    dtype = compute_dtype(logits_p.dtype)
    log_p = torch.log_softmax(logits_p.to(dtype), dim=-1)
    log_q = torch.log_softmax(logits_q.to(dtype), dim=-1)
    p = log_p.exp()
    # Entries with p = 0 contribute 0: zero both logs there *before* the product, so neither
    # the value nor autograd ever forms 0·(−inf − x) = nan.
    support = p > 0
    zero = torch.zeros((), dtype=dtype)
    return (p * (torch.where(support, log_p, zero) - torch.where(support, log_q, zero))).sum(-1)


def reduce_rows(rows: Tensor, mask: Optional[Tensor], reduction: str) -> Tensor:
    """Apply `reduction` to per-row values rows [T] over the rows selected by mask [T] (bool)."""
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = rows.shape[0] if mask is None else mask.sum()
    return total / (count.clamp(min=1) if isinstance(count, Tensor) else max(count, 1))


def kl_div_logits_reference(logits_p: Tensor, logits_q: Tensor, mask: Optional[Tensor] = None,
                            reduction: str = "batchmean") -> Tensor:
    """KL(softmax(logits_p) ‖ softmax(logits_q)) over the last dim, reduced over rows.

    logits_p, logits_q: [..., V] same shape; mask: [...] bool (rows to include) or None.
    Unselected rows are replaced by zeros *before* the softmax, so garbage in them (e.g. all
    −inf) cannot leak nan into the result or the gradients.
    """
    vocab = logits_p.shape[-1]
    p2, q2 = logits_p.reshape(-1, vocab), logits_q.reshape(-1, vocab)
    flat_mask = None if mask is None else mask.reshape(-1)
    if flat_mask is not None:
        keep = flat_mask[:, None]
        p2 = torch.where(keep, p2, torch.zeros((), dtype=p2.dtype))
        q2 = torch.where(keep, q2, torch.zeros((), dtype=q2.dtype))
    out = reduce_rows(kl_rows_reference(p2, q2), flat_mask, reduction)
    return out.reshape(logits_p.shape[:-1]) if reduction == "none" else out


def kl_rows_grad_reference(logits_p: Tensor, logits_q: Tensor, grad_rows: Tensor):
    """Closed-form gradients of Σ_t grad_rows[t]·KL_t (what the kernels implement):
        ∂/∂logits_p[t, v] = g_t · p_v (log p_v − log q_v − KL_t)
        ∂/∂logits_q[t, v] = g_t · (q_v − p_v)
    logits [T, V], grad_rows [T] -> (grad_p, grad_q) [T, V] in the compute dtype."""
    dtype = compute_dtype(logits_p.dtype)
    log_p = torch.log_softmax(logits_p.to(dtype), dim=-1)
    log_q = torch.log_softmax(logits_q.to(dtype), dim=-1)
    p, q = log_p.exp(), log_q.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=dtype))
    kl = (p * diff).sum(-1, keepdim=True)
    g = grad_rows.to(dtype)[:, None]
    return g * p * (diff - kl), g * (q - p)


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
    return torch.stack(norms) if norms else torch.zeros(0)
