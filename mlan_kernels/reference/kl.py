"""KL divergence between rows of logits in plain torch: the oracle the fused KL backends
(backends/kl_*.py, through ops/kl_div.py and ops/fused_linear_kl.py) are tested against.
Gradients of this file come from autograd; kl_rows_grad_reference states them in closed form.

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
from typing import Optional

import torch
from torch import Tensor

# KL accumulates at >= fp32, like the adapter
from ..functional import REDUCTIONS, compute_dtype, reduce_rows


def kl_rows_reference(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p‖q) per row: logits [T, V] -> [T] in compute_dtype(logits_p.dtype)."""
    dtype = compute_dtype(logits_p.dtype)
    log_p = torch.log_softmax(logits_p.to(dtype), dim=1)
    log_q = torch.log_softmax(logits_q.to(dtype), dim=1)
    p = log_p.exp()
    # Entries with p = 0 contribute 0: their log-ratio is replaced *before* the product, so
    # neither the value nor autograd ever forms 0·(−inf) = nan (any finite fill would do).
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(1)


def kl_div_logits_reference(logits_p: Tensor, logits_q: Tensor, mask: Optional[Tensor] = None,
                            reduction: str = "batchmean") -> Tensor:
    """KL(softmax(logits_p) ‖ softmax(logits_q)) over the last dim, reduced over rows.

    logits_p, logits_q: [..., V] same shape; mask: [...] bool (rows to include) or None.
    Unselected rows are replaced by zeros *before* the softmax, so garbage in them (e.g. all
    −inf) cannot leak nan into the result or the gradients.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    vocab = logits_p.shape[-1]
    p2, q2 = logits_p.reshape(-1, vocab), logits_q.reshape(-1, vocab)
    flat_mask = None if mask is None else mask.reshape(-1)
    if flat_mask is not None:
        keep = flat_mask[:, None]
        p2, q2 = torch.where(keep, p2, 0.0), torch.where(keep, q2, 0.0)
    out = reduce_rows(kl_rows_reference(p2, q2), flat_mask, reduction)
    return out.reshape(logits_p.shape[:-1]) if reduction == "none" else out


def kl_rows_grad_reference(logits_p: Tensor, logits_q: Tensor, grad_rows: Tensor):
    """Closed-form gradients of Σ_t grad_rows[t]·KL_t (what the kernels implement):
        ∂/∂logits_p[t, v] = g_t · p_v (log p_v − log q_v − KL_t)
        ∂/∂logits_q[t, v] = g_t · (q_v − p_v)
    logits [T, V], grad_rows [T] -> (grad_p, grad_q) [T, V] in the compute dtype."""
    dtype = compute_dtype(logits_p.dtype)
    log_p = torch.log_softmax(logits_p.to(dtype), dim=1)
    log_q = torch.log_softmax(logits_q.to(dtype), dim=1)
    p, q = log_p.exp(), log_q.exp()
    diff = torch.where(p > 0, log_p - log_q, 0.0)
    kl = (p * diff).sum(1, keepdim=True)
    g = grad_rows.to(dtype)[:, None]
    return g * p * (diff - kl), g * (q - p)
