"""Triton backend: launches the fused kernels of mlan_kernels/triton/mm_adapter_kernels.py
(token kernels) and mm_adapter_weight_kernels.py (prep and finalize).

Contract (mlan_kernels.dispatch): the routed pair `forward_routed` / `backward_routed`, with the
router fused in, so that a forward+backward is five launches and no host read:
    forward   prep (weight slots + routing weights), forward
    backward  pass A (rows), pass B (columns, per-split partials), pass C (finalize: parameter
              gradients and the softmax + router backward)
The forward saves its weight slot matrices (`saved_slots_shape`, a few rows of D in x's dtype)
for the backward. Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests),
where small fixed tile sizes keep programs cheap.
"""
import functools

import torch
import triton

from ..functional import dropout_threshold
from ..triton.mm_adapter_kernels import (mm_adapter_bwd_cols_kernel, mm_adapter_bwd_rows_kernel,
                                         mm_adapter_fwd_kernel)
from ..triton.mm_adapter_weight_kernels import mm_adapter_bwd_finalize_kernel, mm_adapter_prep_kernel
from ..utils import interpreted


def supports(name, device, dtype):
    """None when tensors of this device/dtype can run here, else the reason (the registry
    checked the dtypes and devices). The interpreter (TRITON_INTERPRET=1) runs the kernels in
    numpy, which has no bfloat16: its bf16 dots return garbage, so bf16 is refused there (the
    dispatcher falls back with one warning)."""
    if dtype == torch.bfloat16 and interpreted(device):
        return "the Triton interpreter (TRITON_INTERPRET=1) cannot compute bfloat16 correctly"
    return None


def _layout(rank, experts):
    """(R_PAD, E_PAD): rank slots incl. the bias slot (>= 16 for tl.dot), experts padded to 2^k."""
    return max(16, triton.next_power_of_2(rank + 1)), triton.next_power_of_2(experts)


# (BLOCK_N, BLOCK_D, num_warps) per kernel on GPU, from benchmarks/tune_triton.py on an H100.
GPU_TILES = {"fwd": (32, 128, 4), "rows": (64, 128, 4), "cols": (16, 256, 4)}


def _tiles(kind, dim, device):
    """Tile sizes of kernel `kind` ("fwd" | "rows" | "cols"); small fixed tiles in the interpreter."""
    cap = max(16, triton.next_power_of_2(dim))
    if interpreted(device):
        return 16, min(64, cap), 4
    block_n, block_d, warps = GPU_TILES[kind]
    return block_n, min(block_d, cap), warps


def _precision(dtype):
    """fp32 activations keep fp32 accuracy (3xTF32 on a GPU; the interpreter computes every dot
    in fp32 whatever it is told); 16-bit ones use their tensor cores."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _split(dtype):
    """Split fp32 weights into hi+lo 16-bit parts in the dots that feed ∂w (see dot_weight)."""
    return dtype != torch.float32


def _dropout_args(dropout_p, seed, device):
    """(seed [] int64 on `device`, threshold, keep scale, DROPOUT) of the token kernels; without
    dropout the seed pointer is a placeholder the kernels never read."""
    if dropout_p == 0.0:
        return torch.empty((), dtype=torch.int64, device=device), 0, 1.0, False
    return seed.to(device), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), True


def saved_slots_shape(dim, rank, experts, dtype):
    """Shape of the weight slot matrices a forward saves for its backward (in x's dtype):
    DOWN (R_PAD rows of D) and UP (E_PAD*R_PAD rows), twice (hi, lo) for 16-bit activations."""
    r_pad, e_pad = _layout(rank, experts)
    return r_pad * (1 + e_pad) * (2 if _split(dtype) else 1), dim


def _slot_views(saved, r_pad, split):
    """(down_hi, down_lo, up_hi, up_lo) row blocks of `saved`; without split lo aliases hi."""
    hi, lo = saved.chunk(2) if split else (saved, saved)
    return hi[:r_pad], lo[:r_pad], hi[r_pad:], lo[r_pad:]


def forward_routed(x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias,
                   weights, scale, temperature, dropout_p, seed, groups, single_modality, by_first):
    """x: [B, L, D] contiguous, L >= 1, routed by the router (router_weight [E, D], router_bias
    [E]) on x[:, 0], or by `weights` [B, E] when given; by_first: sample 0 routes every sample;
    single_modality: one combined up-matrix for the batch (routing row 0). seed: [] int64 (used
    with dropout_p > 0). Two launches (prep, forward). Returns y [B, L, D] (x.dtype), h [B, L, r]
    fp32, routing weights [B, E] fp32 and the saved slots [saved_slots_shape] for backward_routed."""
    batch, length, dim = x.shape
    tokens, rank, experts = batch * length, down_weight.shape[0], up_weight.shape[0]
    r_pad, e_pad = _layout(rank, experts)
    split = _split(x.dtype)
    saved = torch.empty(saved_slots_shape(dim, rank, experts, x.dtype), device=x.device, dtype=x.dtype)
    down_hi, down_lo, up_hi, up_lo = _slot_views(saved, r_pad, split)
    up = torch.empty(r_pad, dim, device=x.device, dtype=x.dtype) if single_modality else up_hi
    routing_weights = torch.empty(batch, experts, device=x.device, dtype=torch.float32)
    router = weights is None
    route = x if router else weights.contiguous()
    router_weight, router_bias = ((router_weight.contiguous(), router_bias.contiguous()) if router
                                  else (route, route))          # (not read without the router)
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    mm_adapter_prep_kernel[(triton.cdiv(dim, block_d) + batch,)](
        down_weight.contiguous(), up_weight.contiguous(), up_bias.contiguous(), route,
        router_weight, router_bias, down_hi, down_lo, up_hi, up_lo, up, routing_weights, dim,
        0 if by_first else route.stride(0), float(temperature), scale, R=rank, E=experts,
        R_PAD=r_pad, E_PAD=e_pad, GROUPS=groups, BLOCK_D=block_d, ROUTER=router,
        COMBINE=single_modality, SPLIT=split)

    block_n, block_d, warps = _tiles("fwd", dim, x.device)
    seed, threshold, drop_scale, dropout = _dropout_args(dropout_p, seed, x.device)
    y = torch.empty_like(x)
    h = torch.empty(batch, length, rank, device=x.device, dtype=torch.float32)
    mm_adapter_fwd_kernel[(triton.cdiv(tokens, block_n),)](
        x, y, h, down_hi, down_lo, down_bias.contiguous(), up, routing_weights, tokens, dim,
        length, seed, threshold, drop_scale, scale, R=rank, E=experts, R_PAD=r_pad, E_PAD=e_pad,
        BLOCK_N=block_n, BLOCK_D=block_d, DROPOUT=dropout, SINGLE_MODALITY=single_modality,
        UP_SLOTS=up.shape[0], SPLIT=split, PRECISION=_precision(x.dtype),
        num_warps=warps)
    return y, h, routing_weights, saved


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _multiprocessors(device):
    """The GPU's streaming-multiprocessor count; None under the interpreter."""
    if interpreted(device):
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _row_splits(tokens, dim, block_n, block_d, multiprocessors):
    """(splits, rows per split) of pass B, tokens >= 1: enough programs (splits x column blocks)
    for 4 per multiprocessor, each split a whole number of row blocks, no split empty; one
    split when `multiprocessors` is None (the interpreter: fewer partial buffers)."""
    splits = 1
    if multiprocessors is not None:
        splits = max(1, triton.cdiv(4 * multiprocessors, triton.cdiv(dim, block_d)))
    rows = triton.cdiv(triton.cdiv(tokens, splits), block_n) * block_n
    return triton.cdiv(tokens, rows), rows


def backward_routed(grad_y, grad_routing_weights, x, h, routing_weights, saved, down_weight,
                    down_bias, up_weight, up_bias, router_weight, weights, scale, temperature,
                    dropout_p, seed, groups, by_first):
    """Gradients of a forward_routed call (same x, h, routing weights, saved slots, hyper-
    parameters; weights None = the router routed). grad_routing_weights: optional [B, E] fp32
    gradient of the returned routing weights. Three launches: pass A (rows), pass B (columns,
    per-split partials), pass C (partials summed on device, every gradient written in its
    parameter's dtype and layout, softmax + router backward). Returns (grad_x [B, L, D] with
    the router term, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias, routing
    gradients: [grad_router_weight, grad_router_bias], or [grad_weights] when weights were given)."""
    batch, length, dim = x.shape
    tokens, rank, experts = batch * length, down_weight.shape[0], up_weight.shape[0]
    r_pad, e_pad = _layout(rank, experts)
    split = _split(x.dtype)
    if tuple(saved.shape) != saved_slots_shape(dim, rank, experts, x.dtype):
        raise RuntimeError(f"the triton MM-Adapter backward needs the slots its own forward saved "
                           f"(shape {saved_slots_shape(dim, rank, experts, x.dtype)}), got "
                           f"{list(saved.shape)}: did the forward run another backend?")
    down_hi, _, up_hi, up_lo = _slot_views(saved, r_pad, split)
    block_n, block_d, warps = _tiles("rows", dim, x.device)
    seed, threshold, drop_scale, dropout = _dropout_args(dropout_p, seed, x.device)
    f32 = dict(device=x.device, dtype=torch.float32)
    precision = _precision(x.dtype)
    h = h.contiguous()

    grad_hidden = torch.empty(tokens, rank, **f32)
    grad_coef_rows = torch.empty(tokens, experts, **f32)
    mm_adapter_bwd_rows_kernel[(triton.cdiv(tokens, block_n),)](
        grad_y, h, up_hi, up_lo, routing_weights, grad_hidden, grad_coef_rows, tokens, dim, length,
        seed, threshold, drop_scale, scale, R=rank, E=experts, R_PAD=r_pad, E_PAD=e_pad,
        BLOCK_N=block_n, BLOCK_D=block_d, DROPOUT=dropout, SPLIT=split, PRECISION=precision,
        num_warps=warps)

    block_n, block_d, warps = _tiles("cols", dim, x.device)
    splits, rows_per_split = _row_splits(tokens, dim, block_n, block_d,
                                          _multiprocessors(x.device))
    grad_x = torch.empty_like(x)
    partial_down = torch.empty(splits, r_pad, dim, **f32)
    partial_up = torch.empty(splits, e_pad * r_pad, dim, **f32)
    partial_bias = torch.empty(splits, r_pad, **f32)
    mm_adapter_bwd_cols_kernel[(splits, triton.cdiv(dim, block_d))](
        grad_y, x, grad_x, h, grad_hidden, down_hi, routing_weights, partial_down,
        partial_up, partial_bias, tokens, dim, length, rows_per_split, scale, R=rank, E=experts, R_PAD=r_pad,
        E_PAD=e_pad, BLOCK_N=block_n, BLOCK_D=block_d, SPLIT=split, PRECISION=precision,
        num_warps=warps)

    def like(tensor, shape=None):
        return torch.empty(tensor.shape if shape is None else shape, device=x.device, dtype=tensor.dtype)

    grads = [like(down_weight), like(down_bias), like(up_weight), like(up_bias)]
    router = weights is None
    routing_grads = ([like(router_weight), like(router_weight, (experts,))] if router
                     else [like(weights)])
    routes, rows_per_route, grad_rw_rows = (1, tokens, batch) if by_first else (batch, length, 1)
    has_grad_rw = grad_routing_weights is not None
    grad_rw = grad_routing_weights.float().contiguous() if has_grad_rw else grad_coef_rows
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    mm_adapter_bwd_finalize_kernel[(triton.cdiv(dim, block_d),)](
        partial_down, partial_up, partial_bias, grad_coef_rows, grad_rw, routing_weights, x,
        router_weight.contiguous() if router else x, grad_x, *grads, routing_grads[0],
        routing_grads[-1], splits, dim, batch, length, routes, rows_per_route, grad_rw_rows, scale,
        float(temperature), R=rank, E=experts, R_PAD=r_pad, E_PAD=e_pad, GROUPS=groups,
        BLOCK_D=block_d, BLOCK_L=min(1024, max(16, triton.next_power_of_2(rows_per_route))),
        ROUTER=router, HAS_GRAD_RW=has_grad_rw)
    return (grad_x, *grads, routing_grads)
