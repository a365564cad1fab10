"""Triton kernels of the fused MM-Adapter (forward, and backward in two passes).

Layout. Tokens are rows n of x [N, D] (N = B*L, sample b(n) = n // L). The rank is padded to
R_PAD >= r + 1 and each expert e owns the R_PAD "slots" e*R_PAD .. e*R_PAD+R_PAD-1 of a
K = E_PAD*R_PAD wide axis:
    slot e*R_PAD + i (i < r)  : hidden unit i of expert e   (up row = M_e[:, i]ᵀ)
    slot e*R_PAD + r          : a constant 1                 (up row = b_U[e])
so y = x + H_cat · UPᵀ with H_cat[n, e*R_PAD+i] = s·w[b(n), e] · h_aug[n, i] carries the
expert mixture and the up biases in ONE tl.dot, and the backward gets ∂b_U and the bias part
of ∂w from the same products as ∂M and ∂w. The [K, BLOCK_D] UP tile is gathered straight from
the compact grouped weight [E, D, r/g] (block-diagonal: zero outside the group's block).

Forward   (one program per BLOCK_N rows): pass 1 over D: H = dropout(x W_Aᵀ + b_A), store H;
          pass 2 over D: y = x + H_cat UP (x is re-read while still in L2).
Backward  pass A (per BLOCK_N rows): P = G UPᵀ over D -> ∂H_pre (dropout mask regenerated)
          and per-row ∂w terms;  pass B (per row split x D block): ∂x = G + ∂H_pre W_A,
          partial sums of ∂W_A = ∂H_preᵀ x and ∂UP = H_catᵀ G;  pass C (per D block): sums
          the partials and writes every parameter gradient in its dtype and layout, and ∂w.
"""
import triton
import triton.language as tl


@triton.jit
def dot_split(a, hi, lo, acc, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a · (hi + lo): fp32 weights stored as two parts of a's 16-bit dtype, so the product
    keeps their fp32 accuracy. Rounding weights to bf16 would bias ∂w, and the router's softmax
    backward (a difference of nearly equal ∂w's) amplifies that bias."""
    acc = tl.dot(a, hi, acc, input_precision=PRECISION)
    if SPLIT:
        acc = tl.dot(a, lo, acc, input_precision=PRECISION)
    return acc


@triton.jit
def dot_split_left(hi, lo, b, acc, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + (hi + lo) · b: an fp32 left operand split like in dot_split, for fp32 gradients."""
    acc = tl.dot(hi, b, acc, input_precision=PRECISION)
    if SPLIT:
        acc = tl.dot(lo, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def keep_mask(seed, rows, slots, R: tl.constexpr, threshold):
    """Dropout keep mask [BLOCK_N, R_PAD]: Philox bits of counter n*r + i (see reference.py)."""
    bits = tl.randint(seed, rows[:, None] * R + slots[None, :])
    return (bits >> 8).to(tl.int32) >= threshold


@triton.jit
def load_rows(ptr, rows64, row_ok, cols, col_ok, stride):
    """A [BLOCK_N, BLOCK_D] tile of a row-major [N, stride] tensor (zeros outside)."""
    return tl.load(ptr + rows64[:, None] * stride + cols[None, :],
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def load_hidden(h_ptr, rows64, row_ok, slots, R: tl.constexpr):
    """h_aug [BLOCK_N, R_PAD] fp32: stored H in slots < r, the constant 1 in slot r, 0 above."""
    h = tl.load(h_ptr + rows64[:, None] * R + slots[None, :],
                mask=row_ok[:, None] & (slots[None, :] < R), other=0.0)
    return tl.where(slots[None, :] == R, 1.0, h)


@triton.jit
def load_coef(coef_ptr, scale, rows, row_ok, L, E: tl.constexpr, E_PAD: tl.constexpr):
    """s·w[b(n), e] for each row: [BLOCK_N, E_PAD] fp32 (0 for padded experts); coef_ptr holds
    the fp32 routing weights w [B, E], the scale s is applied here (no separate launch)."""
    experts = tl.arange(0, E_PAD)
    weights = tl.load(coef_ptr + (rows // L)[:, None] * E + experts[None, :],
                      mask=row_ok[:, None] & (experts[None, :] < E), other=0.0)
    return weights * scale


@triton.jit
def mix_experts(h, coef, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr, R_PAD: tl.constexpr):
    """H_cat [BLOCK_N, E_PAD*R_PAD] = coef[:, e] * h for every expert block e."""
    return tl.reshape(coef[:, :, None] * h[:, None, :], (BLOCK_N, E_PAD * R_PAD))


@triton.jit
def load_up_slots(up_w_ptr, up_b_ptr, cols, col_ok, D, R: tl.constexpr, E: tl.constexpr,
                  R_PAD: tl.constexpr, E_PAD: tl.constexpr, GROUPS: tl.constexpr):
    """UP tile [E_PAD*R_PAD, BLOCK_D] fp32 gathered from up_weight [E, D, r/g] and up_bias [E, D]."""
    k = tl.arange(0, E_PAD * R_PAD)
    expert, unit = k // R_PAD, k % R_PAD
    per_group: tl.constexpr = R // GROUPS
    in_block = (unit[:, None] // per_group) == (cols[None, :] // (D // GROUPS))
    weight_ok = (expert[:, None] < E) & (unit[:, None] < R) & in_block & col_ok[None, :]
    weight = tl.load(up_w_ptr + (expert[:, None] * D + cols[None, :]) * per_group
                     + unit[:, None] % per_group, mask=weight_ok, other=0.0)
    bias_ok = (expert[:, None] < E) & (unit[:, None] == R) & col_ok[None, :]
    bias = tl.load(up_b_ptr + expert[:, None] * D + cols[None, :], mask=bias_ok, other=0.0)
    return weight.to(tl.float32) + bias.to(tl.float32)


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
def weight_slots_kernel(down_w_ptr, up_w_ptr, up_b_ptr, coef_ptr, down_hi_ptr, down_lo_ptr,
                        up_hi_ptr, up_lo_ptr, D, scale, R: tl.constexpr, E: tl.constexpr,
                        R_PAD: tl.constexpr, E_PAD: tl.constexpr, GROUPS: tl.constexpr,
                        BLOCK_D: tl.constexpr, COMBINE: tl.constexpr, SPLIT: tl.constexpr):
    """Once per call, in the activations' dtype (hi, and with SPLIT the lo remainder):
    DOWN [R_PAD, D] = W_A zero-padded; UP [E_PAD*R_PAD, D] dense slots, or with COMBINE the
    single-modality matrix Σ_e coef[0, e] UP_e [R_PAD, D]. Token kernels then load plain tiles."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    slots = tl.arange(0, R_PAD)
    down = tl.load(down_w_ptr + slots[:, None] * D + cols[None, :],
                   mask=(slots[:, None] < R) & col_ok[None, :], other=0.0).to(tl.float32)
    store_split(down_hi_ptr, down_lo_ptr, down, slots, cols, col_ok, D, SPLIT)
    up = load_up_slots(up_w_ptr, up_b_ptr, cols, col_ok, D, R, E, R_PAD, E_PAD, GROUPS)
    if COMBINE:
        experts = tl.arange(0, E_PAD)
        coef0 = tl.load(coef_ptr + experts, mask=experts < E, other=0.0) * scale
        up = tl.sum(tl.reshape(up, (E_PAD, R_PAD, BLOCK_D)) * coef0[:, None, None], axis=0)
        store_split(up_hi_ptr, up_lo_ptr, up, slots, cols, col_ok, D, SPLIT)
    else:
        store_split(up_hi_ptr, up_lo_ptr, up, tl.arange(0, E_PAD * R_PAD), cols, col_ok, D, SPLIT)


@triton.jit
def load_slot_rows(ptr, cols, col_ok, D, SLOTS: tl.constexpr):
    """[SLOTS, BLOCK_D] tile of a dense slot matrix [SLOTS, D]."""
    slots = tl.arange(0, SLOTS)
    return tl.load(ptr + slots[:, None] * D + cols[None, :], mask=col_ok[None, :], other=0.0)


@triton.jit(do_not_specialize=["seed"])
def mm_adapter_fwd_kernel(
        x_ptr, y_ptr, h_ptr, down_hi_ptr, down_lo_ptr, down_b_ptr, up_ptr, coef_ptr,
        N, D, L, seed, drop_threshold, drop_scale, scale,
        R: tl.constexpr, E: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr,
        SINGLE_MODALITY: tl.constexpr, UP_SLOTS: tl.constexpr, SPLIT: tl.constexpr,
        PRECISION: tl.constexpr):
    """x, y: [N, D]; h (out): [N, r] fp32; down hi/lo: [R_PAD, D]; up: [UP_SLOTS, D] (dense
    slots [E_PAD*R_PAD, D], or with SINGLE_MODALITY the combined [R_PAD, D] with the routing
    coefficients folded in), all in x's dtype (weight_slots_kernel); coef: [B, E] fp32."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    slots = tl.arange(0, R_PAD)
    dtype = x_ptr.dtype.element_ty

    hidden = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = load_rows(x_ptr, rows64, row_ok, cols, col_ok, D)
        hi = tl.trans(load_slot_rows(down_hi_ptr, cols, col_ok, D, R_PAD))
        lo = tl.trans(load_slot_rows(down_lo_ptr, cols, col_ok, D, R_PAD))
        hidden = dot_split(x, hi, lo, hidden, SPLIT, PRECISION)
    hidden += tl.load(down_b_ptr + slots, mask=slots < R, other=0.0).to(tl.float32)[None, :]
    if DROPOUT:
        hidden = tl.where(keep_mask(seed, rows, slots, R, drop_threshold), hidden * drop_scale, 0.0)
    tl.store(h_ptr + rows64[:, None] * R + slots[None, :], hidden,
             mask=row_ok[:, None] & (slots[None, :] < R))
    hidden = tl.where(slots[None, :] == R, 1.0, hidden)

    if SINGLE_MODALITY:
        mixed = hidden.to(dtype)
    else:
        mixed = mix_experts(hidden, load_coef(coef_ptr, scale, rows, row_ok, L, E, E_PAD),
                            BLOCK_N, E_PAD, R_PAD).to(dtype)
    chunks = tl.cdiv(D, BLOCK_D)
    for chunk in range(0, chunks):  # backwards: the x chunks read last in pass 1 are still in L2
        cols = (chunks - 1 - chunk) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        up = load_slot_rows(up_ptr, cols, col_ok, D, UP_SLOTS)
        x = load_rows(x_ptr, rows64, row_ok, cols, col_ok, D)
        y = x.to(tl.float32) + tl.dot(mixed, up, input_precision=PRECISION)
        tl.store(y_ptr + rows64[:, None] * D + cols[None, :], y.to(dtype),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["seed"])
def mm_adapter_bwd_rows_kernel(
        gy_ptr, h_ptr, up_hi_ptr, up_lo_ptr, coef_ptr, grad_hidden_ptr, grad_coef_ptr,
        N, D, L, seed, drop_threshold, drop_scale, scale,
        R: tl.constexpr, E: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr,
        SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """Pass A. gy: [N, D]; h: [N, r]; up hi/lo: dense slots [E_PAD*R_PAD, D] in gy's dtype. Out: ∂H_pre [N, r]
    fp32 and per-row Σ_i P[n, e, i]·h_aug[n, i] [N, E] fp32 (summed per sample, times s: ∂w)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    slots = tl.arange(0, R_PAD)

    projected = tl.zeros((BLOCK_N, E_PAD * R_PAD), dtype=tl.float32)      # P = G UPᵀ
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = load_rows(gy_ptr, rows64, row_ok, cols, col_ok, D)
        hi = tl.trans(load_slot_rows(up_hi_ptr, cols, col_ok, D, E_PAD * R_PAD))
        lo = tl.trans(load_slot_rows(up_lo_ptr, cols, col_ok, D, E_PAD * R_PAD))
        projected = dot_split(g, hi, lo, projected, SPLIT, PRECISION)
    projected = tl.reshape(projected, (BLOCK_N, E_PAD, R_PAD))

    hidden = load_hidden(h_ptr, rows64, row_ok, slots, R)
    experts = tl.arange(0, E_PAD)
    grad_coef = tl.sum(projected * hidden[:, None, :], axis=2)             # [BLOCK_N, E_PAD]
    tl.store(grad_coef_ptr + rows64[:, None] * E + experts[None, :], grad_coef,
             mask=row_ok[:, None] & (experts[None, :] < E))

    coef = load_coef(coef_ptr, scale, rows, row_ok, L, E, E_PAD)
    grad_hidden = tl.sum(projected * coef[:, :, None], axis=1)              # ∂H [BLOCK_N, R_PAD]
    if DROPOUT:
        grad_hidden = tl.where(keep_mask(seed, rows, slots, R, drop_threshold),
                               grad_hidden * drop_scale, 0.0)
    tl.store(grad_hidden_ptr + rows64[:, None] * R + slots[None, :], grad_hidden,
             mask=row_ok[:, None] & (slots[None, :] < R))


@triton.jit
def mm_adapter_bwd_cols_kernel(
        gy_ptr, x_ptr, gx_ptr, h_ptr, grad_hidden_ptr, down_hi_ptr, coef_ptr,
        partial_down_ptr, partial_up_ptr, partial_bias_ptr, N, D, L, rows_per_split, scale,
        R: tl.constexpr, E: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """Pass B over rows [split*rows_per_split, ...) and one BLOCK_D column block:
    ∂x = G + ∂H_pre W_A (stored), partial ∂W_A [R_PAD, D] and ∂UP [E_PAD*R_PAD, D] per split,
    and (column block 0) the partial ∂b_A = Σ_n ∂H_pre[n] [R_PAD] per split."""
    split = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    slots = tl.arange(0, R_PAD)
    dtype = x_ptr.dtype.element_ty
    down = load_slot_rows(down_hi_ptr, cols, col_ok, D, R_PAD)

    grad_down = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
    grad_up = tl.zeros((E_PAD * R_PAD, BLOCK_D), dtype=tl.float32)
    grad_bias = tl.zeros((R_PAD,), dtype=tl.float32)
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, N)
    for r0 in range(row_begin, row_end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        g = load_rows(gy_ptr, rows64, row_ok, cols, col_ok, D)
        x = load_rows(x_ptr, rows64, row_ok, cols, col_ok, D)
        grad_hidden = tl.load(grad_hidden_ptr + rows64[:, None] * R + slots[None, :],
                              mask=row_ok[:, None] & (slots[None, :] < R), other=0.0)
        grad_bias += tl.sum(grad_hidden, axis=0)
        hidden_hi = grad_hidden.to(dtype)
        grad_x = g.to(tl.float32) + tl.dot(hidden_hi, down, input_precision=PRECISION)
        tl.store(gx_ptr + rows64[:, None] * D + cols[None, :], grad_x.to(dtype),
                 mask=row_ok[:, None] & col_ok[None, :])
        hidden_lo = (grad_hidden - hidden_hi.to(tl.float32)).to(dtype)
        grad_down = dot_split_left(tl.trans(hidden_hi), tl.trans(hidden_lo), x, grad_down,
                                   SPLIT, PRECISION)
        mixed = mix_experts(load_hidden(h_ptr, rows64, row_ok, slots, R),
                            load_coef(coef_ptr, scale, rows, row_ok, L, E, E_PAD), BLOCK_N, E_PAD, R_PAD)
        mixed_hi = mixed.to(dtype)
        mixed_lo = (mixed - mixed_hi.to(tl.float32)).to(dtype)
        grad_up = dot_split_left(tl.trans(mixed_hi), tl.trans(mixed_lo), g, grad_up, SPLIT, PRECISION)

    k = tl.arange(0, E_PAD * R_PAD)
    base = split.to(tl.int64) * D
    tl.store(partial_down_ptr + (base * R_PAD + slots[:, None] * D) + cols[None, :], grad_down,
             mask=col_ok[None, :])
    tl.store(partial_up_ptr + (base * (E_PAD * R_PAD) + k[:, None] * D) + cols[None, :], grad_up,
             mask=col_ok[None, :])
    tl.store(partial_bias_ptr + split * R_PAD + slots, grad_bias,
             mask=slots < R_PAD * (tl.program_id(1) == 0).to(tl.int32))   # column block 0 only


@triton.jit
def mm_adapter_bwd_finalize_kernel(
        partial_down_ptr, partial_up_ptr, partial_bias_ptr, grad_coef_ptr, grad_down_w_ptr,
        grad_down_b_ptr, grad_up_w_ptr, grad_up_b_ptr, grad_routing_ptr, splits, D, B, L, scale,
        R: tl.constexpr, E: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
        GROUPS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Pass C, one program per BLOCK_D columns: sums pass B's per-split partials in a fixed
    order (deterministic) and writes the parameter gradients in their own dtype and layout:
    ∂W_A [r, D], ∂b_A [r] (program 0), ∂up_weight in the compact grouped [E, D, r/g] layout
    (block-diagonal part of ∂M), ∂b_U [E, D]. Programs also share the samples b for
    ∂w[b, e] = s · Σ_l grad_coef[b·L + l, e] ([B, E] fp32)."""
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
    expert, unit = k // R_PAD, k % R_PAD
    per_group: tl.constexpr = R // GROUPS
    in_block = (unit[:, None] // per_group) == (cols[None, :] // (D // GROUPS))
    weight_ok = (expert[:, None] < E) & (unit[:, None] < R) & in_block & col_ok[None, :]
    tl.store(grad_up_w_ptr + (expert[:, None] * D + cols[None, :]) * per_group + unit[:, None] % per_group,
             grad_up.to(grad_up_w_ptr.dtype.element_ty), mask=weight_ok)
    bias_ok = (expert[:, None] < E) & (unit[:, None] == R) & col_ok[None, :]
    tl.store(grad_up_b_ptr + expert[:, None] * D + cols[None, :],
             grad_up.to(grad_up_b_ptr.dtype.element_ty), mask=bias_ok)

    experts = tl.arange(0, E_PAD)
    for b in range(pid, B, tl.num_programs(0)):
        grad_w = tl.zeros((E_PAD,), dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            positions = l0 + tl.arange(0, BLOCK_L)
            rows = (b * L + positions).to(tl.int64)
            terms = tl.load(grad_coef_ptr + rows[:, None] * E + experts[None, :],
                            mask=(positions[:, None] < L) & (experts[None, :] < E), other=0.0)
            grad_w += tl.sum(terms, axis=0)
        tl.store(grad_routing_ptr + b * E + experts, grad_w * scale, mask=experts < E)


@triton.jit
def router_kernel(x_ptr, router_w_ptr, router_b_ptr, out_ptr, D, row_stride, temperature,
                  E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Routing weights of sample b = program 0..: w[b] = softmax((W_R x0[b] + b_R) / t) [E] fp32,
    x0[b] = x_ptr + b·row_stride ([D], any float dtype), W_R [E, D] and b_R [E] in theirs: the
    router (matvec, bias, temperature, softmax) and its fp32 casts in one launch."""
    sample = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < E
    products = tl.zeros((E_PAD, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x0 = tl.load(x_ptr + sample * row_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
        weight = tl.load(router_w_ptr + experts[:, None] * D + cols[None, :],
                         mask=expert_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        products += weight * x0[None, :]
    bias = tl.load(router_b_ptr + experts, mask=expert_ok, other=0.0).to(tl.float32)
    logits = tl.where(expert_ok, (tl.sum(products, axis=1) + bias) / temperature, float("-inf"))
    exp = tl.exp(logits - tl.max(logits, axis=0))
    tl.store(out_ptr + sample * E + experts, exp / tl.sum(exp, axis=0), mask=expert_ok)


@triton.jit
def router_bwd_kernel(grad_w_ptr, rw_ptr, x_ptr, router_w_ptr, gx_ptr, grad_router_w_ptr,
                      grad_router_b_ptr, B, rows_in, D, x_stride, gx_stride, temperature,
                      E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Softmax + router backward for BLOCK_D columns, every sample b < B in order (fp32):
    dz[b] = w[b] ⊙ (dw[b] − <w[b], dw[b]>) / t;  ∂W_R[:, cols] = Σ_b dz[b] x0[b, cols] (in W_R's
    dtype), ∂b_R = Σ_b dz[b] (program 0), and ∂x0[b, cols] += dz[b] W_R[:, cols] in place.
    dw[b] is the sum of grad_w rows b·rows_in .. b·rows_in + rows_in − 1 (rows_in = B_batch with
    B = 1: single_modality=True, where sample 0 routed the whole batch)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    experts = tl.arange(0, E_PAD)
    expert_ok = experts < E
    router_w = tl.load(router_w_ptr + experts[:, None] * D + cols[None, :],
                       mask=expert_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    grad_router_w = tl.zeros((E_PAD, BLOCK_D), dtype=tl.float32)
    grad_router_b = tl.zeros((E_PAD,), dtype=tl.float32)
    for b in range(0, B):
        grad_w = tl.zeros((E_PAD,), dtype=tl.float32)
        for j in range(0, rows_in):
            grad_w += tl.load(grad_w_ptr + (b * rows_in + j) * E + experts, mask=expert_ok, other=0.0)
        weights = tl.load(rw_ptr + b * E + experts, mask=expert_ok, other=0.0)
        grad_logits = weights * (grad_w - tl.sum(weights * grad_w, axis=0)) / temperature
        grad_router_b += grad_logits
        row = tl.full((), b, tl.int64)
        x0 = tl.load(x_ptr + row * x_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
        grad_router_w += grad_logits[:, None] * x0[None, :]
        gx_ptrs = gx_ptr + row * gx_stride + cols
        gx = tl.load(gx_ptrs, mask=col_ok, other=0.0).to(tl.float32)
        gx += tl.sum(grad_logits[:, None] * router_w, axis=0)
        tl.store(gx_ptrs, gx.to(gx_ptr.dtype.element_ty), mask=col_ok)
    tl.store(grad_router_w_ptr + experts[:, None] * D + cols[None, :],
             grad_router_w.to(grad_router_w_ptr.dtype.element_ty),
             mask=expert_ok[:, None] & col_ok[None, :])
    tl.store(grad_router_b_ptr + experts, grad_router_b.to(grad_router_b_ptr.dtype.element_ty),
             mask=expert_ok & (experts < E * (pid == 0).to(tl.int32)))
