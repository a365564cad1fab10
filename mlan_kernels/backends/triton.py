"""Triton backend: launches the fused kernels of mlan_kernels/triton/mm_adapter_kernels.py.

Same `forward`/`backward` contract as every MM-Adapter backend (mlan_kernels.dispatch). Runs on CUDA tensors, and on CPU
tensors under TRITON_INTERPRET=1 (tests), where small fixed tile sizes keep programs cheap.
"""
import functools

import torch
import triton

from ..functional import dropout_threshold
from ..triton.mm_adapter_kernels import (mm_adapter_bwd_cols_kernel, mm_adapter_bwd_finalize_kernel,
                                         mm_adapter_bwd_rows_kernel, mm_adapter_fwd_kernel,
                                         router_bwd_kernel, router_kernel,
                                         weight_slots_kernel)
from ..utils import triton_interpreter

def supports(name, device, dtype):
    """None when tensors of this device/dtype can run here, else the reason (the registry
    checked the dtypes and devices). The interpreter (TRITON_INTERPRET=1) runs the kernels in
    numpy, which has no bfloat16: its bf16 dots return garbage, so bf16 is refused there (the
    dispatcher falls back with one warning)."""
    if dtype == torch.bfloat16 and _interpreted(device):
        return "the Triton interpreter (TRITON_INTERPRET=1) cannot compute bfloat16 correctly"
    return None


def _interpreted(device) -> bool:
    return device.type != "cuda" or triton_interpreter()


def _layout(rank, experts):
    """(R_PAD, E_PAD): rank slots incl. the bias slot (>= 16 for tl.dot), experts padded to 2^k."""
    return max(16, triton.next_power_of_2(rank + 1)), triton.next_power_of_2(experts)


# (BLOCK_N, BLOCK_D, num_warps) per kernel on GPU, from benchmarks/tune_triton.py on an H100.
GPU_TILES = {"fwd": (32, 128, 4), "rows": (64, 128, 4), "cols": (16, 256, 4)}


def _tiles(kind, dim, device):
    """Tile sizes of kernel `kind` ("fwd" | "rows" | "cols"); small fixed tiles in the interpreter."""
    cap = max(16, triton.next_power_of_2(dim))
    if _interpreted(device):
        return 16, min(64, cap), 4
    block_n, block_d, warps = GPU_TILES[kind]
    return block_n, min(block_d, cap), warps


def _precision(dtype, device):
    """fp32 activations keep fp32 accuracy (3xTF32 on GPU); 16-bit ones use their tensor cores."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if _interpreted(device) else "tf32x3"


def _split(dtype):
    """Split fp32 weights into hi+lo 16-bit parts in the dots that feed ∂w (see dot_weight)."""
    return dtype != torch.float32


def _dropout_args(dropout_p):
    return dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), dropout_p > 0.0


def _weight_slots(x, down_weight, up_weight, up_bias, coef, scale, groups, r_pad, e_pad, combine):
    """(down_hi, down_lo, up_hi, up_lo) slot matrices in x's dtype, one launch (see
    weight_slots_kernel). For fp32 x there is no split: lo aliases hi and is never read."""
    experts, dim, _ = up_weight.shape
    rank, split = down_weight.shape[0], _split(x.dtype)
    up_slots = r_pad if combine else e_pad * r_pad
    down_hi = torch.empty(r_pad, dim, device=x.device, dtype=x.dtype)
    up_hi = torch.empty(up_slots, dim, device=x.device, dtype=x.dtype)
    down_lo = torch.empty_like(down_hi) if split else down_hi
    up_lo = torch.empty_like(up_hi) if split else up_hi
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    weight_slots_kernel[(triton.cdiv(dim, block_d),)](
        down_weight.contiguous(), up_weight.contiguous(), up_bias.contiguous(), coef, down_hi,
        down_lo, up_hi, up_lo, dim, scale, R=rank, E=experts, R_PAD=r_pad, E_PAD=e_pad, GROUPS=groups,
        BLOCK_D=block_d, COMBINE=combine, SPLIT=split)
    return down_hi, down_lo, up_hi, up_lo


def routing(x0, router_weight, router_bias, temperature):
    """The router's [B, E] fp32 softmax for routing tokens x0 [B, D] in one launch (the op's
    default, functional.routing_weights, costs 4 launches, 7 with 16-bit inputs)."""
    batch, dim = x0.shape
    experts = router_weight.shape[0]
    if x0.stride(-1) != 1:                  # (a stride-0 row axis is fine: rows repeat row 0)
        x0 = x0.contiguous()
    out = torch.empty(batch, experts, device=x0.device, dtype=torch.float32)
    router_kernel[(batch,)](x0, router_weight.contiguous(), router_bias.contiguous(), out, dim,
                            x0.stride(0), float(temperature), E=experts,
                            E_PAD=triton.next_power_of_2(experts),
                            BLOCK_D=min(256, max(16, triton.next_power_of_2(dim))))
    return out


def router_backward(grad_w, routing_weights, x, router_weight, temperature, grad_x, by_first=False):
    """Softmax + router backward in one launch: returns (∂W_R, ∂b_R) in router_weight's dtype and
    adds dz W_R into grad_x[:, 0] in place; with by_first only sample 0 routed, by the sum of
    grad_w's rows. None when the layouts do not fit (the op then runs its aten version)."""
    rows, experts = grad_w.shape
    routed, rows_in = (1, rows) if by_first else (rows, 1)
    dim = x.shape[-1]
    if x.numel() == 0 or x.stride(-1) != 1 or grad_x.stride(-1) != 1:
        return None
    grad_router_weight = torch.empty(router_weight.shape, device=x.device, dtype=router_weight.dtype)
    grad_router_bias = torch.empty(experts, device=x.device, dtype=router_weight.dtype)
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    router_bwd_kernel[(triton.cdiv(dim, block_d),)](
        grad_w.float().contiguous(), routing_weights.float().contiguous(), x,
        router_weight.contiguous(), grad_x, grad_router_weight, grad_router_bias, routed, rows_in, dim,
        x.stride(0), grad_x.stride(0), float(temperature), E=experts,
        E_PAD=triton.next_power_of_2(experts), BLOCK_D=block_d)
    return grad_router_weight, grad_router_bias


def forward(x, down_weight, down_bias, up_weight, up_bias, routing_weights, scale, dropout_p,
            seed, groups, single_modality):
    """x: [B, L, D] contiguous; routing_weights: [B, E]. Returns y [B, L, D] (x.dtype), h [B, L, r] fp32."""
    batch, length, dim = x.shape
    tokens, rank, experts = batch * length, down_weight.shape[0], up_weight.shape[0]
    r_pad, e_pad = _layout(rank, experts)
    block_n, block_d, warps = _tiles("fwd", dim, x.device)
    threshold, drop_scale, dropout = _dropout_args(dropout_p)
    y = torch.empty_like(x)
    h = torch.empty(batch, length, rank, device=x.device, dtype=torch.float32)
    coef = routing_weights.float().contiguous()       # fp32 [B, E]: no copy; s applied in-kernel
    down_hi, down_lo, up, _ = _weight_slots(x, down_weight, up_weight, up_bias, coef, scale,
                                            groups, r_pad, e_pad, combine=single_modality)
    mm_adapter_fwd_kernel[(triton.cdiv(tokens, block_n),)](
        x, y, h, down_hi, down_lo, down_bias.contiguous(), up, coef, tokens, dim, length,
        seed, threshold, drop_scale, scale, R=rank, E=experts, R_PAD=r_pad, E_PAD=e_pad,
        BLOCK_N=block_n, BLOCK_D=block_d, DROPOUT=dropout, SINGLE_MODALITY=single_modality,
        UP_SLOTS=up.shape[0], SPLIT=_split(x.dtype), PRECISION=_precision(x.dtype, x.device),
        num_warps=warps)
    return y, h


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _row_splits(tokens, dim, block_n, block_d, device):
    """Rows per program of pass B: enough programs to fill the GPU, few partial buffers."""
    if _interpreted(device):
        splits = 1
    else:
        programs_per_split = triton.cdiv(dim, block_d)
        index = device.index if device.index is not None else torch.cuda.current_device()
        splits = max(1, triton.cdiv(4 * _multiprocessors(index), programs_per_split))
    rows = triton.cdiv(triton.cdiv(tokens, splits), block_n) * block_n
    return triton.cdiv(tokens, rows), rows


def backward(grad_y, x, h, routing_weights, down_weight, down_bias, up_weight, up_bias, scale,
             dropout_p, seed, groups):
    """Returns (grad_x [B, L, D] without router term, grad_down_weight, grad_down_bias,
    grad_up_weight, grad_up_bias, grad_routing_weights [B, E] fp32). Four launches: weight
    slots, pass A (rows), pass B (columns, per-split partials), pass C (finalize: partials
    summed on device, every gradient written in its parameter's dtype and layout)."""
    batch, length, dim = x.shape
    tokens, rank, experts = batch * length, down_weight.shape[0], up_weight.shape[0]
    r_pad, e_pad = _layout(rank, experts)
    block_n, block_d, warps = _tiles("rows", dim, x.device)
    threshold, drop_scale, dropout = _dropout_args(dropout_p)
    f32 = dict(device=x.device, dtype=torch.float32)
    coef = routing_weights.float().contiguous()
    h = h.contiguous()
    down_hi, _, up_hi, up_lo = _weight_slots(x, down_weight, up_weight, up_bias, coef, scale,
                                             groups, r_pad, e_pad, combine=False)
    precision = _precision(x.dtype, x.device)

    grad_hidden = torch.empty(tokens, rank, **f32)
    grad_coef_rows = torch.empty(tokens, experts, **f32)
    mm_adapter_bwd_rows_kernel[(triton.cdiv(tokens, block_n),)](
        grad_y, h, up_hi, up_lo, coef, grad_hidden, grad_coef_rows, tokens, dim, length, seed, threshold,
        drop_scale, scale, R=rank, E=experts, R_PAD=r_pad, E_PAD=e_pad, BLOCK_N=block_n,
        BLOCK_D=block_d, DROPOUT=dropout, SPLIT=_split(x.dtype), PRECISION=precision,
        num_warps=warps)

    block_n, block_d, warps = _tiles("cols", dim, x.device)
    splits, rows_per_split = _row_splits(tokens, dim, block_n, block_d, x.device)
    grad_x = torch.empty_like(x)
    partial_down = torch.empty(splits, r_pad, dim, **f32)
    partial_up = torch.empty(splits, e_pad * r_pad, dim, **f32)
    partial_bias = torch.empty(splits, r_pad, **f32)
    mm_adapter_bwd_cols_kernel[(splits, triton.cdiv(dim, block_d))](
        grad_y, x, grad_x, h, grad_hidden, down_hi, coef, partial_down,
        partial_up, partial_bias, tokens, dim, length, rows_per_split, scale, R=rank, E=experts, R_PAD=r_pad,
        E_PAD=e_pad, BLOCK_N=block_n, BLOCK_D=block_d, SPLIT=_split(x.dtype), PRECISION=precision,
        num_warps=warps)

    grad_down_weight = torch.empty(down_weight.shape, device=x.device, dtype=down_weight.dtype)
    grad_down_bias = torch.empty(down_bias.shape, device=x.device, dtype=down_bias.dtype)
    grad_up_weight = torch.empty(up_weight.shape, device=x.device, dtype=up_weight.dtype)
    grad_up_bias = torch.empty(up_bias.shape, device=x.device, dtype=up_bias.dtype)
    grad_routing = torch.empty(batch, experts, **f32)
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    block_l = min(64, max(16, triton.next_power_of_2(length)))
    mm_adapter_bwd_finalize_kernel[(triton.cdiv(dim, block_d),)](
        partial_down, partial_up, partial_bias, grad_coef_rows, grad_down_weight, grad_down_bias,
        grad_up_weight, grad_up_bias, grad_routing, splits, dim, batch, length, scale, R=rank,
        E=experts, R_PAD=r_pad, E_PAD=e_pad, GROUPS=groups, BLOCK_D=block_d, BLOCK_L=block_l)
    return grad_x, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias, grad_routing
