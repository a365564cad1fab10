"""Triton kernels of the fused MM-Adapter (forward, and backward in two passes).

Layout. Tokens are rows n of x [N, D] (N = B*L, sample b(n) = n // L). The rank is padded to
R_PAD >= r + 1 and each expert e owns the R_PAD "slots" e*R_PAD .. e*R_PAD+R_PAD-1 of a
K = E_PAD*R_PAD wide axis:
    slot e*R_PAD + i (i < r)  : hidden unit i of expert e   (up row = M_e[:, i]ᵀ)
    slot e*R_PAD + r          : a constant 1                 (up row = b_U[e])
so y = x + H_cat · UPᵀ with H_cat[n, e*R_PAD+i] = s·w[b(n), e] · h_aug[n, i] carries the
expert mixture and the up biases in ONE tl.dot, and the backward gets ∂b_U and the bias part
of ∂w from the same products as ∂M and ∂w. The [K, D] UP slots (gathered from the compact
grouped weight [E, D, r/g], block-diagonal: zero outside the group's block) and the padded
DOWN [R_PAD, D] are written once per forward by mm_adapter_weight_kernels.mm_adapter_prep_kernel
and saved for the backward; the token kernels below load plain tiles of them.

Forward   (one program per BLOCK_N rows): pass 1 over D: H = dropout(x W_Aᵀ + b_A), store H;
          pass 2 over D: y = x + H_cat UP (x is re-read while still in L2).
Backward  pass A (per BLOCK_N rows): P = G UPᵀ over D -> ∂H_pre (dropout mask regenerated)
          and per-row ∂w terms;  pass B (per row split x D block): ∂x = G + ∂H_pre W_A,
          partial sums of ∂W_A = ∂H_preᵀ x and ∂UP = H_catᵀ G;  pass C
          (mm_adapter_weight_kernels.mm_adapter_bwd_finalize_kernel): sums the partials, writes
          every parameter gradient in its dtype and layout, and the routing gradient.
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
def keep_mask(seed_ptr, rows, slots, R: tl.constexpr, threshold):
    """Dropout keep mask [BLOCK_N, R_PAD]: Philox bits of counter n*r + i (functional.py), key =
    the int64 seed read from the device (no host read, so the launch is graph-capturable)."""
    bits = tl.randint(tl.load(seed_ptr), rows[:, None] * R + slots[None, :])
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
def load_slot_rows(ptr, cols, col_ok, D, SLOTS: tl.constexpr):
    """[SLOTS, BLOCK_D] tile of a dense slot matrix [SLOTS, D]."""
    slots = tl.arange(0, SLOTS)
    return tl.load(ptr + slots[:, None] * D + cols[None, :], mask=col_ok[None, :], other=0.0)


@triton.jit
def mm_adapter_fwd_kernel(
        x_ptr, y_ptr, h_ptr, down_hi_ptr, down_lo_ptr, down_b_ptr, up_ptr, coef_ptr,
        N, D, L, seed_ptr, drop_threshold, drop_scale, scale,
        R: tl.constexpr, E: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr,
        SINGLE_MODALITY: tl.constexpr, UP_SLOTS: tl.constexpr, SPLIT: tl.constexpr,
        PRECISION: tl.constexpr):
    """x, y: [N, D]; h (out): [N, r] fp32; down hi/lo: [R_PAD, D]; up: [UP_SLOTS, D] (dense
    slots [E_PAD*R_PAD, D], or with SINGLE_MODALITY the combined [R_PAD, D] with the routing
    coefficients folded in), all in x's dtype (the prep kernel); coef: [B, E] fp32; seed: [] int64
    (read with DROPOUT only)."""
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
        hidden = tl.where(keep_mask(seed_ptr, rows, slots, R, drop_threshold), hidden * drop_scale, 0.0)
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


@triton.jit
def mm_adapter_bwd_rows_kernel(
        gy_ptr, h_ptr, up_hi_ptr, up_lo_ptr, coef_ptr, grad_hidden_ptr, grad_coef_ptr,
        N, D, L, seed_ptr, drop_threshold, drop_scale, scale,
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
        grad_hidden = tl.where(keep_mask(seed_ptr, rows, slots, R, drop_threshold),
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
