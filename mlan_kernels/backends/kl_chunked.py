"""KL backend "chunked": plain torch over blocks of rows, never more than CHUNK_ROWS·V
temporaries in the compute dtype. Runs every device and dtype: the only float64 path, and the
fallback when the compiled or Triton kernels cannot run. Contract: mlan_kernels.dispatch."""
from typing import Optional

import torch
from torch import Tensor

from ..functional import compute_dtype

CHUNK_ROWS = 64          # rows per block (measured: README, "fused KL")


def _row_blocks(total: int, mask: Optional[Tensor], block: int):
    """Index tensors (or slices) of the selected rows, `block` at a time."""
    if mask is None:
        return [slice(start, min(start + block, total)) for start in range(0, total, block)]
    return list(mask.nonzero().flatten().split(block))


def forward(logits_p, logits_q, mask):
    """The cpu kernels' formula in torch ops (csrc/cpu/kl_div_kernels.h): with e = e^(x−max x),
    f = e^(y−max y), d = (x−max x) − (y−max y), KL = Σe·d/Σe + log1p(Σ(f − e)/Σe) with f − e as
    e·expm1(−d) where |d| < 0.5, which keeps its accuracy when p ≈ q, unlike log Σf − log Σe."""
    dtype = compute_dtype(logits_p.dtype)
    total = logits_p.shape[0]
    kl, lse_p, lse_q = (logits_p.new_zeros(total, dtype=dtype) for _ in range(3))
    for rows in _row_blocks(total, mask, CHUNK_ROWS):
        x, y = logits_p[rows].to(dtype), logits_q[rows].to(dtype)     # [rows, V]: dim 1 is V
        max_x, max_y = x.amax(1, keepdim=True), y.amax(1, keepdim=True)
        e, f = x - max_x, y - max_y                       # shifted logits, then their exps
        d = e - f
        e.exp_()
        f.exp_()
        supported = e > 0
        sum_e, sum_f = e.sum(1), f.sum(1)
        weighted = (e * d).masked_fill_(supported.logical_not(), 0.0).sum(1)
        # Σ (f − e): e·expm1(−d) where |d| < 0.5 (there f − e would cancel), else f − e itself
        gap = torch.where(d.abs() < 0.5, d.neg().expm1_().mul_(e), f - e)
        differences = torch.where(supported, gap, f).sum(1)
        kl[rows] = weighted / sum_e + torch.log1p(differences / sum_e)
        lse_p[rows], lse_q[rows] = max_x.squeeze(1) + sum_e.log(), max_y.squeeze(1) + sum_f.log()
    return kl, lse_p, lse_q


def backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, inplace=False):
    if inplace:              # each block is read in full before its gradients are written
        grad_p, grad_q = logits_p, logits_q
    else:
        grad_p, grad_q = torch.zeros_like(logits_p), torch.zeros_like(logits_q)
    for rows in _row_blocks(logits_p.shape[0], mask, CHUNK_ROWS):
        # three [rows, V] blocks in the compute dtype (lse's, which 16-bit logits are promoted
        # to, exactly), updated in place
        diff = logits_p[rows] - lse_p[rows, None]                     # log p
        prob_q = logits_q[rows] - lse_q[rows, None]                   # log q
        prob_p = diff.exp()
        diff.sub_(prob_q).masked_fill_(prob_p.gt(0).logical_not_(), 0.0)   # log p − log q where p > 0
        grad = grad_kl[rows, None]                                     # compute dtype (kl's)
        prob_q.exp_().sub_(prob_p).mul_(grad)                          # grad · (q − p)
        grad_p[rows] = diff.sub_(kl[rows, None]).mul_(prob_p).mul_(grad).to(grad_p.dtype)
        grad_q[rows] = prob_q.to(grad_q.dtype)
    return grad_p, grad_q
