"""Triton kernels of the fused row-wise KL(p‖q) between two logit matrices [T, V].

One program per row t. The forward walks the vocabulary once in BLOCK_V chunks and keeps, per
lane j of the chunk, online log-sum-exp state for BOTH rows (fp32, whatever the logits' dtype):
    m_p, s_p = running max and Σ exp(x − m_p) of logits_p        (x = logits_p[t, v])
    a        = Σ exp(x − m_p) · (x − y)                            (y = logits_q[t, v])
    m_q, s_q = the same for logits_q
and merges the lanes at the end:  lse = M + log Σ_j s_j e^{m_j − M},
    KL_t = Σ_v p_v (x_v − y_v) − lse_p + lse_q = A / S_p − lse_p + lse_q.
So each logit is read once (2·V elements per row) and nothing of size V is written. That
difference of log-sum-exps carries fp32's ~1e-6 absolute error, which swamps the KL of two
nearly equal rows (adjacent training steps, where κ is measured). When it is below NEAR_KL the
program reads the row once more with the maxima known (kl_near: the cpu kernels' formula,
log1p of a sum of per-element differences), so only such rows pay the second read.
Entries with x = −inf have p_v = 0 and contribute nothing (never 0·inf = nan); rows that the
mask leaves out are not read at all (KL_t = 0, lse = 0).

The backward reads both rows once more and writes both gradients (see reference/kl.py):
    ∂logits_p = g_t · p (x − y − (lse_p − lse_q) − KL_t),   ∂logits_q = g_t · (q − p).
"""
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))    # a global a @jit function may read
NEAR_KL = tl.constexpr(1e-2)             # below this first-pass KL, the second pass (kl_near) runs


@triton.jit
def exp_shifted(value, shift):
    """exp(value − shift), and exactly 0 where value = −inf (also when shift = −inf)."""
    return tl.where(value == NEG_INF, 0.0, tl.exp(value - shift))


@triton.jit
def scaled(total, factor):
    """total · factor, with 0 where factor = 0 (an underflowed scale times an infinite sum
    would be nan; the lane's weight is then negligible)."""
    return tl.where(factor > 0, total * factor, 0.0)


@triton.jit
def merge_lanes(maximum, total):
    """(M, Σ_j total_j · e^{m_j − M}) of per-lane online-softmax state [BLOCK_V]."""
    row_max = tl.max(maximum, axis=0)
    return row_max, tl.sum(scaled(total, exp_shifted(maximum, row_max)), axis=0)


@triton.jit
def load_pair(p_ptr, q_ptr, row, stride_p, stride_q, cols, limit):
    """Columns `cols` of row `row` of both logit matrices as fp32; −inf at cols >= limit."""
    x = tl.load(p_ptr + row * stride_p + cols, mask=cols < limit, other=NEG_INF).to(tl.float32)
    y = tl.load(q_ptr + row * stride_q + cols, mask=cols < limit, other=NEG_INF).to(tl.float32)
    return x, y


@triton.jit
def expm1_small(u):
    """e^u − 1 for |u| < 0.5 by its Taylor series to degree 8 (relative error < 1e-8)."""
    series = 1.0 / 40320.0
    series = series * u + 1.0 / 5040.0
    series = series * u + 1.0 / 720.0
    series = series * u + 1.0 / 120.0
    series = series * u + 1.0 / 24.0
    series = series * u + 1.0 / 6.0
    series = series * u + 0.5
    return (series * u + 1.0) * u


@triton.jit
def log1p(z):
    """log(1 + z) without losing z's digits when |z| is small (Goldberg's correction)."""
    u = 1.0 + z
    return tl.where(u == 1.0, z, tl.log(u) * (z / (u - 1.0)))


@triton.jit
def kl_near(p_ptr, q_ptr, row, stride_p, stride_q, V, max_p, max_q, total_p,
            BLOCK_V: tl.constexpr):
    """KL of a row from a second pass with the row maxima known (the cpu kernels' formula):
    with e = e^(x−max_p), f = e^(y−max_q), d = (x−max_p) − (y−max_q),
        KL = Σe·d / S + log1p(Σ (f − e) / S),   f − e = e·expm1(−d) by its series where |d| < 0.5,
    so log(Σf / S) keeps its relative accuracy when p ≈ q (S = Σe from the first pass)."""
    lanes = tl.arange(0, BLOCK_V)
    weighted = tl.zeros((BLOCK_V,), tl.float32)
    differences = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        x, y = load_pair(p_ptr, q_ptr, row, stride_p, stride_q, start + lanes, V)
        e = exp_shifted(x, max_p)
        f = exp_shifted(y, max_q)
        d = (x - max_p) - (y - max_q)
        supported = e > 0
        weighted += tl.where(supported, e * d, 0.0)
        gap = tl.where(tl.abs(d) < 0.5, e * expm1_small(-d), f - e)
        differences += tl.where(supported, gap, f)
    return tl.sum(weighted, axis=0) / total_p + log1p(tl.sum(differences, axis=0) / total_p)


@triton.jit
def row_is_active(mask_ptr, row, HAS_MASK: tl.constexpr):
    """Whether row `row` is selected (mask [T] uint8; every row when there is no mask)."""
    if HAS_MASK:
        return tl.load(mask_ptr + row) != 0
    return row >= 0                              # a boolean tensor like the masked case


@triton.jit
def kl_forward_kernel(p_ptr, q_ptr, mask_ptr, kl_ptr, lse_p_ptr, lse_q_ptr, V, stride_p, stride_q,
                      HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr):
    """KL_t, lse_p[t], lse_q[t] (fp32) for row t = program_id(0) of logits [T, V] (row-major)."""
    row = tl.program_id(0).to(tl.int64)
    active = row_is_active(mask_ptr, row, HAS_MASK)
    end = tl.where(active, V, 0)                 # unselected rows: the loop runs zero times
    lanes = tl.arange(0, BLOCK_V)
    max_p = tl.full((BLOCK_V,), NEG_INF, tl.float32)
    max_q = tl.full((BLOCK_V,), NEG_INF, tl.float32)
    sum_p = tl.zeros((BLOCK_V,), tl.float32)
    sum_q = tl.zeros((BLOCK_V,), tl.float32)
    cross = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, end, BLOCK_V):
        x, y = load_pair(p_ptr, q_ptr, row, stride_p, stride_q, start + lanes, V)
        new_max_p = tl.maximum(max_p, x)
        rescale = exp_shifted(max_p, new_max_p)
        weight = exp_shifted(x, new_max_p)
        sum_p = sum_p * rescale + weight
        cross = scaled(cross, rescale) + tl.where(weight > 0, weight * (x - y), 0.0)
        max_p = new_max_p
        new_max_q = tl.maximum(max_q, y)
        sum_q = sum_q * exp_shifted(max_q, new_max_q) + exp_shifted(y, new_max_q)
        max_q = new_max_q
    row_max_p, total_p = merge_lanes(max_p, sum_p)
    _, total_cross = merge_lanes(max_p, cross)
    row_max_q, total_q = merge_lanes(max_q, sum_q)
    lse_p = row_max_p + tl.log(total_p)
    lse_q = row_max_q + tl.log(total_q)
    kl = total_cross / total_p - lse_p + lse_q
    if active & (kl < NEAR_KL):                  # p ≈ q: fp32 cancellation above; re-read the row
        kl = kl_near(p_ptr, q_ptr, row, stride_p, stride_q, V, row_max_p, row_max_q, total_p, BLOCK_V)
    tl.store(kl_ptr + row, tl.where(active, kl, 0.0))
    tl.store(lse_p_ptr + row, tl.where(active, lse_p, 0.0))
    tl.store(lse_q_ptr + row, tl.where(active, lse_q, 0.0))


@triton.jit
def kl_backward_kernel(grad_kl_ptr, p_ptr, q_ptr, mask_ptr, lse_p_ptr, lse_q_ptr, kl_ptr,
                       grad_p_ptr, grad_q_ptr, V, stride_p, stride_q, stride_grad,
                       HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr):
    """∂logits_p, ∂logits_q [T, V] (the logits' dtype, contiguous) of Σ_t grad_kl[t]·KL_t;
    zeros on unselected rows. grad_kl [T] with stride stride_grad (0: a reduction's expanded
    scalar gradient, read without a copy)."""
    row = tl.program_id(0).to(tl.int64)
    active = row_is_active(mask_ptr, row, HAS_MASK)
    grad = tl.load(grad_kl_ptr + row * stride_grad).to(tl.float32)
    lse_p = tl.load(lse_p_ptr + row)
    lse_q = tl.load(lse_q_ptr + row)
    kl = tl.load(kl_ptr + row)
    limit = tl.where(active, V, 0)               # unselected rows: nothing read, zeros written
    lanes = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        ok = cols < V
        x, y = load_pair(p_ptr, q_ptr, row, stride_p, stride_q, cols, limit)
        prob_p = exp_shifted(x, lse_p)
        prob_q = exp_shifted(y, lse_q)
        diff = tl.where(prob_p > 0, (x - lse_p) - (y - lse_q), 0.0)
        grad_p = tl.where(active, grad * prob_p * (diff - kl), 0.0)
        grad_q = tl.where(active, grad * (prob_q - prob_p), 0.0)
        tl.store(grad_p_ptr + row * V + cols, grad_p.to(grad_p_ptr.dtype.element_ty), mask=ok)
        tl.store(grad_q_ptr + row * V + cols, grad_q.to(grad_q_ptr.dtype.element_ty), mask=ok)
