"""The MM-Adapter forward in plain torch: the oracle every backend is tested against.

Notation (see docs/mm_adapter.md): x [B, L, D], rank r, E experts, g groups.
    z_b = (W_R x[b, 0] + b_R) / t          routing logits, fp32          [B, E]
    w_b = softmax(z_b)                      (or given as `weights`)       [B, E]
    H   = dropout(x W_Aᵀ + b_A)             shared by all experts         [B, L, r]
    y   = x + s Σ_e w_{b,e} (H M_eᵀ + b_U[e])
M_e is the dense [D, r] block-diagonal form of the grouped up-projection
up_weight[e] ([D, r/g]): output channel j reads hidden block j // (D/g).
The router softmax, the dense form and the dropout mask (Philox, bit-identical to Triton's
`tl.randint`) are production helpers of mlan_kernels/functional.py. The backward oracle is
autograd of the forward (mm_adapter_backward_reference).
"""
import torch

from ..functional import compute_dtype, dense_up_weight, dropout_keep_mask, routing_weights


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
    keep = dropout_keep_mask(seed, batch * length, h.shape[-1], dropout_p, x.device)  # all at p=0
    h = h * keep.view_as(h) / (1.0 - dropout_p)

    dense_up = dense_up_weight(up_weight.to(compute), groups)             # [E, D, r]
    per_expert = torch.einsum("blr,edr->bled", h, dense_up) + up_bias.to(compute)[None, None]
    mixed = torch.einsum("be,bled->bld", weights, per_expert)              # [B, L, D]
    y = xc + scale * mixed
    return y.to(x.dtype), h, weights


def mm_adapter_backward_reference(grad_y, x, down_weight, down_bias, up_weight, up_bias,
                                  routing_weights, scale, dropout_p, seed, groups):
    """The backward oracle: gradients of <grad_y, y> by autograd of mm_adapter_reference with the
    routing weights [B, E] as a leaf (the backends' backward contract, every argument given:
    the op adds the router term). Returns (grad_x, grad_down_weight, grad_down_bias,
    grad_up_weight, grad_up_bias, grad_routing_weights), each in its input's dtype."""
    leaves = [tensor.detach().requires_grad_() for tensor in
              (x, down_weight, down_bias, up_weight, up_bias, routing_weights)]
    with torch.enable_grad():
        y, _, _ = mm_adapter_reference(*leaves[:5], weights=leaves[5], scale=scale,
                                       dropout_p=dropout_p, seed=seed, groups=groups)
        return torch.autograd.grad(y, leaves, grad_y)
