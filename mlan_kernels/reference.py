"""The MM-Adapter math in plain torch: the oracle every backend is tested against.

Notation (see docs/mm_adapter.md): x [B, L, D], rank r, E experts, g groups.
    z_b = (W_R x[b, 0] + b_R) / t          routing logits, fp32          [B, E]
    w_b = softmax(z_b)                      (or given as `weights`)       [B, E]
    H   = dropout(x W_Aᵀ + b_A)             shared by all experts         [B, L, r]
    y   = x + s Σ_e w_{b,e} (H M_eᵀ + b_U[e])
M_e is the dense [D, r] block-diagonal form of the grouped up-projection
up_weight[e] ([D, r/g]): output channel j reads hidden block j // (D/g).

Dropout is defined by a counter-based RNG so that forward and backward (and every
backend) regenerate the same mask from (seed, token, unit) without storing it:
    keep[n, i] = philox(seed, counter=n*r + i) >> 8  >=  round(p * 2^24)
with n the flat token index b*L + l. The Philox4x32-10 below is bit-identical to
Triton's `tl.randint`.  Gradients of this file come from autograd.
"""
import torch

_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor):
    """(a * b) >> 32 and (a * b) & 0xFFFFFFFF for a 32-bit constant a and uint32 values b (int64)."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    low = a * b_lo                      # < 2^48
    high = a * b_hi                     # < 2^48; full product = low + high * 2^16
    mid = low + ((high & 0xFFFF) << 16)
    return (high >> 16) + (mid >> 32), mid & _MASK32


def philox_uint32(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 first output word for counters (c0=counter, c1=c2=c3=0), key = 64-bit seed.

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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def dropout_threshold(p: float) -> int:
    """24-bit integer threshold: a unit is dropped when its random 24-bit value is below it."""
    return int(round(p * (1 << 24)))


def dropout_keep_mask(seed: int, num_tokens: int, rank: int, p: float, device=None) -> torch.Tensor:
    """keep mask [num_tokens, rank] (bool) of the MM-Adapter's dropout; all True when p == 0."""
    if p == 0.0:
        return torch.ones(num_tokens, rank, dtype=torch.bool, device=device)
    counter = torch.arange(num_tokens * rank, dtype=torch.int64, device=device)
    bits24 = philox_uint32(seed, counter) >> 8
    return (bits24 >= dropout_threshold(p)).view(num_tokens, rank)


def dense_up_weight(up_weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped up-projection [E, D, r/g] -> dense block-diagonal [E, D, r]."""
    experts, dim, rank_per_group = up_weight.shape
    rank = rank_per_group * groups
    dense = up_weight.new_zeros(experts, groups, dim // groups, groups, rank_per_group)
    blocks = up_weight.view(experts, groups, dim // groups, rank_per_group)
    for k in range(groups):                 # block k: channels k*D/g.., hidden units k*r/g..
        dense[:, k, :, k, :] = blocks[:, k]
    return dense.view(experts, dim, rank)


def compact_up_weight(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of dense_up_weight: keep the block-diagonal part of [E, D, r] -> [E, D, r/g]."""
    experts, dim, rank = dense.shape
    blocks = dense.view(experts, groups, dim // groups, groups, rank // groups)
    return torch.stack([blocks[:, k, :, k, :] for k in range(groups)], dim=1).reshape(
        experts, dim, rank // groups)


def routing_weights(x0: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Per-sample softmax router in fp32. x0: [B, D] routing tokens -> [B, E] fp32."""
    compute = compute_dtype(x0.dtype)
    logits = x0.to(compute) @ router_weight.to(compute).t() + router_bias.to(compute)
    return torch.softmax(logits / temperature, dim=-1)


def mm_adapter_reference(x, down_weight, down_bias, up_weight, up_bias, router_weight=None,
                         router_bias=None, weights=None, scale=1.0, temperature=10.0,
                         dropout_p=0.0, seed=0, groups=1):
    """Reference MM-Adapter forward.

    x: [B, L, D]; down_weight: [r, D]; down_bias: [r]; up_weight: [E, D, r/g]; up_bias: [E, D];
    router_weight: [E, D]; router_bias: [E]; weights: optional [B, E] that replaces the router.
    Computes in fp32 (fp64 if x is fp64). Returns (y [B, L, D] in x.dtype,
    h [B, L, r] post-dropout hidden in the compute dtype, routing weights [B, E]).
    """
    batch, length, dim = x.shape
    compute = compute_dtype(x.dtype)
    xc = x.to(compute)
    if weights is None:
        weights = routing_weights(x[:, 0], router_weight, router_bias, temperature)
    weights = weights.to(compute)

    h = xc @ down_weight.to(compute).t() + down_bias.to(compute)          # [B, L, r]
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed, batch * length, h.shape[-1], dropout_p, x.device)
        h = h * keep.view_as(h) / (1.0 - dropout_p)

    dense_up = dense_up_weight(up_weight.to(compute), groups)             # [E, D, r]
    per_expert = torch.einsum("blr,edr->bled", h, dense_up) + up_bias.to(compute)[None, None]
    mixed = torch.einsum("be,bled->bld", weights, per_expert)              # [B, L, D]
    y = xc + scale * mixed
    return y.to(x.dtype), h, weights
