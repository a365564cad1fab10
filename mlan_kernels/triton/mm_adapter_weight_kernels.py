"""Triton kernels of the MM-Adapter that work on the weights, one launch each side of the token
kernels (mm_adapter_kernels.py, whose header explains the slot layout):

    prep      (before the forward)  the weight slot matrices, and the routing weights
    finalize  (after pass B)        the parameter gradients from pass B's partials, and the
                                    routing gradient: ∂weights, or the softmax + router backward

Both grid over BLOCK_D column blocks of the weights; prep adds one program per sample for the
router. Everything is computed in fp32 and stored in its destination's dtype.
"""
import triton
import triton.language as tl


@triton.jit
def up_slot_layout(cols, col_ok, D, R: tl.constexpr, E: tl.constexpr, R_PAD: tl.constexpr,
                   E_PAD: tl.constexpr, GROUPS: tl.constexpr):
    """Where the UP slots [E_PAD*R_PAD, BLOCK_D] live in the compact parameters: offsets and
    masks into up_weight [E, D, r/g] (block-diagonal part of M_e) and up_bias [E, D] (slot r)."""
    k = tl.arange(0, E_PAD * R_PAD)
    expert, unit = k // R_PAD, k % R_PAD
    per_group: tl.constexpr = R // GROUPS
    in_block = (unit[:, None] // per_group) == (cols[None, :] // (D // GROUPS))
    weight_ok = (expert[:, None] < E) & (unit[:, None] < R) & in_block & col_ok[None, :]
    weight_offsets = (expert[:, None] * D + cols[None, :]) * per_group + unit[:, None] % per_group
    bias_ok = (expert[:, None] < E) & (unit[:, None] == R) & col_ok[None, :]
    return weight_offsets, weight_ok, expert[:, None] * D + cols[None, :], bias_ok


@triton.jit
def store_split(hi_ptr, lo_ptr, value, rows, cols, col_ok, D, SPLIT: tl.constexpr):
    """Store fp32 value [ROWS, BLOCK_D] as hi (= value in hi's dtype) and, with SPLIT, lo (the rest)."""
    offsets = rows[:, None] * D + cols[None, :]
    hi = value.to(hi_ptr.dtype.element_ty)
    tl.store(hi_ptr + offsets, hi, mask=col_ok[None, :])
    if SPLIT:
        tl.store(lo_ptr + offsets, (value - hi.to(tl.float32)).to(lo_ptr.dtype.element_ty),
                 mask=col_ok[None, :])


@triton.jit
def route_row(route_ptr, row_offset, router_w_ptr, router_b_ptr, D, temperature,
              E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_D: tl.constexpr, ROUTER: tl.constexpr):
    """Routing weights of one sample [E_PAD] fp32 (0 for padded experts). ROUTER: the router on
    the token at route_ptr + row_offset ([D], any float dtype): softmax((W_R x0 + b_R) / t), W_R
    [E, D] and b_R [E] in their dtype. Else the given weights row at route_ptr + row_offset [E]."""
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < E
    if ROUTER:
        products = tl.zeros((E_PAD, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            x0 = tl.load(route_ptr + row_offset + cols, mask=col_ok, other=0.0).to(tl.float32)
            weight = tl.load(router_w_ptr + experts[:, None] * D + cols[None, :],
                             mask=expert_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            products += weight * x0[None, :]
        bias = tl.load(router_b_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)
        logits = tl.where(expert_ok, (tl.sum(products, axis=1) + bias) / temperature, float("-inf"))
        exp = tl.exp(logits - tl.max(logits, axis=0))
        weights = exp / tl.sum(exp, axis=0)
    else:
        weights = tl.load(route_ptr + row_offset + experts, mask=expert_ok, other=0.0).to(tl.float32)
    return weights


@triton.jit
def mm_adapter_prep_kernel(
        down_w_ptr, up_w_ptr, up_b_ptr, route_ptr, router_w_ptr, router_b_ptr, down_hi_ptr,
        down_lo_ptr, up_hi_ptr, up_lo_ptr, combined_ptr, rw_ptr, D, route_stride, temperature, scale,
        R: tl.constexpr, E: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
        GROUPS: tl.constexpr, BLOCK_D: tl.constexpr, ROUTER: tl.constexpr,
        COMBINE: tl.constexpr, SPLIT: tl.constexpr):
    """Once per forward. Programs 0 .. cdiv(D, BLOCK_D)-1, BLOCK_D columns each, in the
    activations' dtype (hi, and with SPLIT the lo remainder): DOWN [R_PAD, D] = W_A zero-padded,
    UP [E_PAD*R_PAD, D] dense slots (saved for the backward) and, with COMBINE, the
    single-modality matrix Σ_e s·w[0, e] UP_e [R_PAD, D] (hi only). Program cdiv(D, BLOCK_D) + b:
    the routing weights w[b] [E] fp32 of route row b (route_ptr + b·route_stride, see route_row;
    route_stride 0: sample 0 routes every sample)."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(D, BLOCK_D)
    experts = tl.arange(0, E_PAD)
    if pid < blocks:
        cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        slots = tl.arange(0, R_PAD)
        down = tl.load(down_w_ptr + slots[:, None] * D + cols[None, :],
                       mask=(slots[:, None] < R) & col_ok[None, :], other=0.0).to(tl.float32)
        store_split(down_hi_ptr, down_lo_ptr, down, slots, cols, col_ok, D, SPLIT)
        weight_offsets, weight_ok, bias_offsets, bias_ok = up_slot_layout(
            cols, col_ok, D, R, E, R_PAD, E_PAD, GROUPS)
        up = (tl.load(up_w_ptr + weight_offsets, mask=weight_ok, other=0.0).to(tl.float32)
              + tl.load(up_b_ptr + bias_offsets, mask=bias_ok, other=0.0).to(tl.float32))
        store_split(up_hi_ptr, up_lo_ptr, up, tl.arange(0, E_PAD * R_PAD), cols, col_ok, D, SPLIT)
        if COMBINE:     # (each program routes sample 0 itself: the same sums as program blocks + 0)
            coef = route_row(route_ptr, 0, router_w_ptr, router_b_ptr, D, temperature, E, E_PAD,
                             BLOCK_D, ROUTER) * scale
            mixed = tl.sum(tl.reshape(up, (E_PAD, R_PAD, BLOCK_D)) * coef[:, None, None], axis=0)
            store_split(combined_ptr, combined_ptr, mixed, slots, cols, col_ok, D, False)
    else:
        sample = (pid - blocks).to(tl.int64)
        weights = route_row(route_ptr, sample * route_stride, router_w_ptr, router_b_ptr, D,
                            temperature, E, E_PAD, BLOCK_D, ROUTER)
        tl.store(rw_ptr + sample * E + experts, weights, mask=experts < E)


@triton.jit
def routing_grad(grad_coef_ptr, grad_rw_ptr, route, rows, grad_rw_rows, scale, E: tl.constexpr,
                 E_PAD: tl.constexpr, BLOCK_L: tl.constexpr, HAS_GRAD_RW: tl.constexpr):
    """∂w of route `route` [E_PAD] fp32: s · Σ grad_coef over its `rows` token rows (pass A's
    per-row terms [N, E]) + Σ of its `grad_rw_rows` rows of the routing weights' own gradient."""
    experts = tl.arange(0, E_PAD)
    first = tl.full((), route, tl.int64) * rows
    total = tl.zeros((BLOCK_L, E_PAD), dtype=tl.float32)
    for l0 in range(0, rows, BLOCK_L):
        positions = l0 + tl.arange(0, BLOCK_L)
        total += tl.load(grad_coef_ptr + (first + positions)[:, None] * E + experts[None, :],
                         mask=(positions[:, None] < rows) & (experts[None, :] < E), other=0.0)
    grad = tl.sum(total, axis=0) * scale
    if HAS_GRAD_RW:
        for j in range(0, grad_rw_rows):
            grad += tl.load(grad_rw_ptr + (route * grad_rw_rows + j) * E + experts,
                            mask=experts < E, other=0.0)
    return grad


@triton.jit
def mm_adapter_bwd_finalize_kernel(
        partial_down_ptr, partial_up_ptr, partial_bias_ptr, grad_coef_ptr, grad_rw_ptr, rw_ptr,
        x_ptr, router_w_ptr, gx_ptr, grad_down_w_ptr, grad_down_b_ptr, grad_up_w_ptr,
        grad_up_b_ptr, grad_route_w_ptr, grad_route_b_ptr, splits, D, B, L, routes,
        rows_per_route, grad_rw_rows, scale, temperature,
        R: tl.constexpr, E: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
        GROUPS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
        ROUTER: tl.constexpr, HAS_GRAD_RW: tl.constexpr):
    """Pass C, one program per BLOCK_D columns. Sums pass B's per-split partials in a fixed order
    (deterministic) into ∂W_A [r, D], ∂b_A [r] (program 0), ∂up_weight [E, D, r/g] and ∂b_U
    [E, D], each in its parameter's dtype. Then the routing gradient of `routes` routes of
    rows_per_route token rows each (routes = 1, rows_per_route = N: sample 0 routed the batch):
    ROUTER: every program walks all routes b in order: dz = w ⊙ (∂w − <w, ∂w>) / t;
        ∂W_R[:, cols] = Σ_b dz x0[b, cols] (W_R's dtype), ∂b_R = Σ_b dz (program 0), and
        ∂x[b·L, cols] += dz W_R[:, cols] in place (x0 = the routing token, row b·L of x [N, D]).
    else: ∂weights [B, E] in its dtype (the programs share the rows; rows >= routes get 0)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    slots = tl.arange(0, R_PAD)
    k = tl.arange(0, E_PAD * R_PAD)
    grad_down = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
    grad_up = tl.zeros((E_PAD * R_PAD, BLOCK_D), dtype=tl.float32)
    grad_bias = tl.zeros((R_PAD,), dtype=tl.float32)
    down_ptrs = partial_down_ptr + slots[:, None] * D + cols[None, :]
    up_ptrs = partial_up_ptr + k[:, None] * D + cols[None, :]
    for split in range(0, splits):          # pointers advance one split at a time (64-bit)
        grad_down += tl.load(down_ptrs, mask=col_ok[None, :], other=0.0)
        grad_up += tl.load(up_ptrs, mask=col_ok[None, :], other=0.0)
        grad_bias += tl.load(partial_bias_ptr + split * R_PAD + slots)
        down_ptrs += R_PAD * D
        up_ptrs += E_PAD * R_PAD * D
    tl.store(grad_down_w_ptr + slots[:, None] * D + cols[None, :],
             grad_down.to(grad_down_w_ptr.dtype.element_ty), mask=(slots[:, None] < R) & col_ok[None, :])
    tl.store(grad_down_b_ptr + slots, grad_bias.to(grad_down_b_ptr.dtype.element_ty),
             mask=slots < R * (pid == 0).to(tl.int32))                    # program 0 only
    weight_offsets, weight_ok, bias_offsets, bias_ok = up_slot_layout(cols, col_ok, D, R, E, R_PAD,
                                                                      E_PAD, GROUPS)
    tl.store(grad_up_w_ptr + weight_offsets, grad_up.to(grad_up_w_ptr.dtype.element_ty), mask=weight_ok)
    tl.store(grad_up_b_ptr + bias_offsets, grad_up.to(grad_up_b_ptr.dtype.element_ty), mask=bias_ok)

    experts = tl.arange(0, E_PAD)
    expert_ok = experts < E
    if ROUTER:
        router_w = tl.load(router_w_ptr + experts[:, None] * D + cols[None, :],
                           mask=expert_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        grad_router_w = tl.zeros((E_PAD, BLOCK_D), dtype=tl.float32)
        grad_router_b = tl.zeros((E_PAD,), dtype=tl.float32)
        for b in range(0, routes):
            grad_w = routing_grad(grad_coef_ptr, grad_rw_ptr, b, rows_per_route, grad_rw_rows,
                                  scale, E, E_PAD, BLOCK_L, HAS_GRAD_RW)
            weights = tl.load(rw_ptr + b * E + experts, mask=expert_ok, other=0.0)
            grad_logits = weights * (grad_w - tl.sum(weights * grad_w, axis=0)) / temperature
            grad_router_b += grad_logits
            row = tl.full((), b, tl.int64) * L * D + cols        # the routing token of sample b
            x0 = tl.load(x_ptr + row, mask=col_ok, other=0.0).to(tl.float32)
            grad_router_w += grad_logits[:, None] * x0[None, :]
            gx = tl.load(gx_ptr + row, mask=col_ok, other=0.0).to(tl.float32)
            gx += tl.sum(grad_logits[:, None] * router_w, axis=0)
            tl.store(gx_ptr + row, gx.to(gx_ptr.dtype.element_ty), mask=col_ok)
        tl.store(grad_route_w_ptr + experts[:, None] * D + cols[None, :],
                 grad_router_w.to(grad_route_w_ptr.dtype.element_ty),
                 mask=expert_ok[:, None] & col_ok[None, :])
        tl.store(grad_route_b_ptr + experts, grad_router_b.to(grad_route_b_ptr.dtype.element_ty),
                 mask=experts < E * (pid == 0).to(tl.int32))              # program 0 only
    else:
        for b in range(pid, B, tl.num_programs(0)):
            routed = b < routes
            grad_w = routing_grad(grad_coef_ptr, grad_rw_ptr, b, tl.where(routed, rows_per_route, 0),
                                  tl.where(routed, grad_rw_rows, 0), scale, E, E_PAD, BLOCK_L,
                                  HAS_GRAD_RW)
            tl.store(grad_route_w_ptr + b * E + experts,
                     grad_w.to(grad_route_w_ptr.dtype.element_ty), mask=expert_ok)
