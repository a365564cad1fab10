"""MM-Adapter backend "reference": the op in plain torch, on any device and dtype (the only
float64 path, and the fallback when no fused backend can run). Not the oracle: the tests
compare it, like every backend, against mlan_kernels.reference. Its backward states the design
doc's gradient formulas (docs/mm_adapter.md) in torch. Contract: mlan_kernels.dispatch.
"""
import torch

from ..functional import compact_up_weight, compute_dtype, dense_up_weight, dropout_keep_mask


def _hidden(xc, down_weight, down_bias, dropout_p, seed):
    """H = dropout(x W_Aᵀ + b_A) [B, L, r] in the compute dtype of xc [B, L, D]."""
    h = xc @ down_weight.to(xc.dtype).t() + down_bias                   # the sum promotes b_A
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed, h.shape[0] * h.shape[1], h.shape[2], dropout_p, xc.device)
        h = h * keep.view_as(h) / (1.0 - dropout_p)
    return h


def forward(x, down_weight, down_bias, up_weight, up_bias, routing_weights, scale, dropout_p,
            seed, groups, single_modality):
    """x: [B, L, D]; routing_weights: [B, E] in the compute dtype (fp32; fp64 for fp64 x).
    Returns y [B, L, D] (x.dtype), h [B, L, r] (the compute dtype).

    Each sample's experts are mixed before the up-projection (one [D, r] matrix per sample):
    y = x + s (H (Σ_e w_{b,e} M_e)ᵀ + Σ_e w_{b,e} b_U[e])."""
    compute = compute_dtype(x.dtype)
    xc, w = x.to(compute), routing_weights
    h = _hidden(xc, down_weight, down_bias, dropout_p, seed)                  # [B, L, r]
    mixed_up = torch.einsum("be,edr->bdr", w, dense_up_weight(up_weight.to(compute), groups))
    mixed_bias = w @ up_bias.to(compute)                                      # [B, D]
    y = xc + scale * (torch.einsum("blr,bdr->bld", h, mixed_up) + mixed_bias[:, None])
    return y.to(x.dtype), h


def backward(grad_y, x, h, routing_weights, down_weight, down_bias, up_weight, up_bias, scale,
             dropout_p, seed, groups):
    """Gradients of <grad_y, y>: (grad_x [B, L, D] without the router term, grad_down_weight,
    grad_down_bias, grad_up_weight, grad_up_bias, grad_routing_weights [B, E]). h and
    routing_weights come in the compute dtype (the forward's h, the op's routing weights)."""
    batch, length, dim = x.shape
    rank = down_weight.shape[0]
    compute = compute_dtype(x.dtype)
    g, xc, w, hc = grad_y.to(compute), x.to(compute), routing_weights, h    # hc: post-dropout H
    dense_up = dense_up_weight(up_weight.to(compute), groups)               # [E, D, r]

    per_expert = torch.einsum("bld,edr->bler", g, dense_up)                 # P_e = G M_e
    grad_h = torch.einsum("be,bler->blr", scale * w, per_expert)            # ∂H
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed, batch * length, rank, dropout_p, x.device).view_as(grad_h)
        grad_h = grad_h * keep / (1.0 - dropout_p)                          # ∂H_pre
    grad_x = g + grad_h @ down_weight.to(compute)
    grad_down_weight = grad_h.reshape(-1, rank).t() @ xc.reshape(-1, dim)
    grad_down_bias = grad_h.sum((0, 1))

    g_sum = g.sum(1)                                                        # Σ_l G  [B, D]
    grad_dense = scale * torch.einsum("be,bld,blr->edr", w, g, hc)
    grad_up_bias = scale * w.t() @ g_sum
    grad_w = scale * (torch.einsum("bler,blr->be", per_expert, hc) + g_sum @ up_bias.to(compute).t())
    return (grad_x.to(x.dtype), grad_down_weight.to(down_weight.dtype),
            grad_down_bias.to(down_bias.dtype),
            compact_up_weight(grad_dense, groups).to(up_weight.dtype),
            grad_up_bias.to(up_bias.dtype), grad_w)
