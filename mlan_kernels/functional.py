"""Plain-torch building blocks shared by the ops, the backends, the modules and the oracle.

Production code: the router softmax, the grouped up-projection's dense/compact forms, the
counter-based dropout mask and the row reductions of the KL. The oracle (mlan_kernels.reference,
test-only) imports them too; the math it states on top of them is its own.

Notation (docs/mm_adapter.md): x [B, L, D], rank r, E experts, g groups.
Dropout is defined by a counter-based RNG so that forward and backward (and every backend)
regenerate the same mask from (seed, token, unit) without storing it:
    keep[n, i] = philox(seed, counter=n*r + i) >> 8  >=  round(p * 2^24)
with n the flat token index b*L + l. The Philox4x32-10 below is bit-identical to Triton's
`tl.randint`.
"""
from typing import Optional

import torch
from torch import Tensor

from .ops.validation import check_seed

_MASK32 = 0xFFFFFFFF
REDUCTIONS = ("batchmean", "sum", "none")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _mul_hi_lo(a: int, b: Tensor):
    """(a * b) >> 32 and (a * b) & 0xFFFFFFFF for a 32-bit constant a and uint32 values b (int64)."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    low = a * b_lo                      # < 2^48
    high = a * b_hi                     # < 2^48; full product = low + high * 2^16
    mid = low + ((high & 0xFFFF) << 16)
    return (high >> 16) + (mid >> 32), mid & _MASK32


def philox_uint32(seed, counter: Tensor) -> Tensor:
    """Philox4x32-10 first output word for counters (c0=counter, c1=c2=c3=0), key = 64-bit seed
    (an int, or an int64 scalar tensor on counter's device: then nothing is read on the host).

    counter: int64 tensor of values in [0, 2^32). Returns int64 tensor of values in [0, 2^32).
    """
    c0 = counter.to(torch.int64) & _MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(0xCD9E8D57, c2)
        hi_a, lo_a = _mul_hi_lo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0


def dropout_threshold(p: float) -> int:
    """24-bit integer threshold: a unit is dropped when its random 24-bit value is below it."""
    return int(round(p * (1 << 24)))


def dropout_keep_mask(seed, num_tokens: int, rank: int, p: float, device=None) -> Tensor:
    """keep mask [num_tokens, rank] (bool) of the MM-Adapter's dropout; all True when p == 0.
    seed: int or int64 scalar tensor (see philox_uint32); anything else is a TypeError."""
    check_seed(seed)
    if p == 0.0:
        return torch.ones(num_tokens, rank, dtype=torch.bool, device=device)
    counter = torch.arange(num_tokens * rank, device=device)                # int64
    bits24 = philox_uint32(seed, counter) >> 8
    return (bits24 >= dropout_threshold(p)).view(num_tokens, rank)


def dense_up_weight(up_weight: Tensor, groups: int) -> Tensor:
    """Grouped up-projection [E, D, r/g] -> dense block-diagonal [E, D, r]: output channel j
    reads hidden block j // (D/g)."""
    experts, dim, rank_per_group = up_weight.shape
    rank = rank_per_group * groups
    dense = up_weight.new_zeros(experts, groups, dim // groups, groups, rank_per_group)
    blocks = up_weight.view(experts, groups, dim // groups, rank_per_group)
    for k in range(groups):                 # block k: channels k*D/g.., hidden units k*r/g..
        dense[:, k, :, k, :] = blocks[:, k]
    return dense.view(experts, dim, rank)


def compact_up_weight(dense: Tensor, groups: int) -> Tensor:
    """Inverse of dense_up_weight: keep the block-diagonal part of [E, D, r] -> [E, D, r/g]."""
    experts, dim, rank = dense.shape
    blocks = dense.view(experts, groups, dim // groups, groups, rank // groups)
    return torch.stack([blocks[:, k, :, k, :] for k in range(groups)], dim=1).reshape(
        experts, dim, rank // groups)


def routing_weights(x0: Tensor, router_weight: Tensor, router_bias: Tensor,
                    temperature: float) -> Tensor:
    """Per-sample softmax router in fp32: w_b = softmax((W_R x0_b + b_R) / t).
    x0: [B, D] routing tokens -> [B, E] (fp32; fp64 for fp64 x0)."""
    compute = compute_dtype(x0.dtype)
    logits = x0.to(compute) @ router_weight.to(compute).t() + router_bias.to(compute)
    return torch.softmax(logits / temperature, dim=1)


def reduce_rows(rows: Tensor, mask: Optional[Tensor], reduction: str) -> Tensor:
    """Apply `reduction` to per-row values rows [T] over the rows selected by mask [T] (bool):
    "none" -> [T] (0 on unselected rows), "sum", "batchmean" (sum / max(#selected, 1))."""
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = rows.shape[0] if mask is None else mask.sum()
    return total / (count.clamp(min=1) if isinstance(count, Tensor) else max(count, 1))
