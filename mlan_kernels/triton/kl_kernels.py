"""Triton kernels of the fused row-wise KL(p‖q) between two logit matrices [T, V].

One program per row t. The forward walks the vocabulary once in BLOCK_V chunks (after reading
the first chunk for the shift c below) and keeps per lane j of the chunk, in fp32:
    m_p, S = running max and Σ e with e = exp(x − m_p)              (x = logits_p[t, v])
    A      = Σ e·δ,  G = Σ (e^(y−c−m_p) − e)  over the columns where x − m_p > −80
             (δ = (y − x) − c; e^(y−c−m_p) − e = e·expm1(δ), by its series when |δ| < 0.5)
    m_q, S_q, O = running max, Σ exp(y − m_q), and that sum over the other columns
                                                                     (y = logits_q[t, v])
and merges the lanes at the end (lse = M + log Σ_j s_j e^{m_j − M}). Then
    KL_t = log1p(G' / S) − A / S       with G' = G + O·e^(M_q − c − M_p),
which equals Σ_v p_v (log p_v − log q_v) and keeps its accuracy when p ≈ q: both terms are
≈ E_p[δ] and their difference ≈ Var_p(δ)/2, whereas lse_q − lse_p − (...) would carry fp32's
~1e-6 absolute error. c = the mean of y − x over the first chunk centres δ. If G' is not
finite (q far above p somewhere; KL is then large), KL_t = −A/S − c − lse_p + lse_q.
Each logit is read once (2·V elements per row, plus the first chunk again) and nothing of size
V is written. Entries with x = −inf have p_v = 0 and contribute nothing (never 0·inf = nan);
rows that the mask leaves out are not read at all (KL_t = 0, lse = 0).

The backward reads both rows once more and writes both gradients (see reference_kl.py):
    ∂logits_p = g_t · p (x − y − (lse_p − lse_q) − KL_t),   ∂logits_q = g_t · (q − p).
"""
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))    # a global a @jit function may read


@triton.jit
def exp_shifted(value, shift):
    """exp(value − shift), and exactly 0 where value = −inf (also when shift = −inf)."""
    return tl.where(value == NEG_INF, 0.0, tl.exp(value - shift))


@triton.jit
def merge_lanes(maximum, total):
    """(M, Σ_j total_j · e^{m_j − M}) of per-lane online-softmax state [BLOCK_V]."""
    row_max = tl.max(maximum, axis=0)
    return row_max, tl.sum(total * exp_shifted(maximum, row_max), axis=0)


@triton.jit
def row_is_active(mask_ptr, row, HAS_MASK: tl.constexpr):
    """Whether row `row` is selected (mask [T] uint8; every row when there is no mask)."""
    if HAS_MASK:
        return tl.load(mask_ptr + row) != 0
    return row >= 0                              # a boolean tensor like the masked case


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
def row_shift(p_ptr, q_ptr, row, stride_p, stride_q, V, end, BLOCK_V: tl.constexpr):
    """c = mean of y − x over the first block's columns where both are finite (0 if none): the
    constant that centres δ = (y − x) − c, so that δ is small when q ≈ p up to a shift."""
    cols = tl.arange(0, BLOCK_V)
    ok = cols < tl.minimum(V, end)
    x = tl.load(p_ptr + row * stride_p + cols, mask=ok, other=NEG_INF).to(tl.float32)
    y = tl.load(q_ptr + row * stride_q + cols, mask=ok, other=NEG_INF).to(tl.float32)
    finite = (x > NEG_INF) & (y > NEG_INF) & (x < -NEG_INF) & (y < -NEG_INF)
    count = tl.sum(finite.to(tl.float32), axis=0)
    return tl.sum(tl.where(finite, y - x, 0.0), axis=0) / tl.maximum(count, 1.0)


@triton.jit
def kl_forward_kernel(p_ptr, q_ptr, mask_ptr, kl_ptr, lse_p_ptr, lse_q_ptr, V, stride_p, stride_q,
                      HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr):
    """KL_t, lse_p[t], lse_q[t] (fp32) for row t = program_id(0) of logits [T, V] (row-major)."""
    row = tl.program_id(0).to(tl.int64)
    active = row_is_active(mask_ptr, row, HAS_MASK)
    end = tl.where(active, V, 0)                 # unselected rows: the loop runs zero times
    shift = row_shift(p_ptr, q_ptr, row, stride_p, stride_q, V, end, BLOCK_V)
    lanes = tl.arange(0, BLOCK_V)
    max_p = tl.full((BLOCK_V,), NEG_INF, tl.float32)
    max_q = tl.full((BLOCK_V,), NEG_INF, tl.float32)
    sum_p = tl.zeros((BLOCK_V,), tl.float32)
    sum_q = tl.zeros((BLOCK_V,), tl.float32)
    cross = tl.zeros((BLOCK_V,), tl.float32)     # Σ e·δ
    gap = tl.zeros((BLOCK_V,), tl.float32)       # Σ (e^(y−c−m) − e) where p is represented
    orphan = tl.zeros((BLOCK_V,), tl.float32)    # Σ e^(y−m_q) where it is not
    for start in range(0, end, BLOCK_V):
        cols = start + lanes
        ok = cols < V
        x = tl.load(p_ptr + row * stride_p + cols, mask=ok, other=NEG_INF).to(tl.float32)
        y = tl.load(q_ptr + row * stride_q + cols, mask=ok, other=NEG_INF).to(tl.float32)
        new_max_p = tl.maximum(max_p, x)
        rescale = exp_shifted(max_p, new_max_p)
        weight = exp_shifted(x, new_max_p)
        shifted = x - new_max_p
        represented = shifted > -80.0            # p_v >= e^-80 of the running max
        delta = (y - x) - shift
        term = tl.where(tl.abs(delta) < 0.5, weight * expm1_small(delta), tl.exp(shifted + delta) - weight)
        sum_p = sum_p * rescale + weight
        cross = cross * rescale + tl.where(represented, weight * delta, 0.0)
        gap = gap * rescale + tl.where(represented, term, 0.0)
        max_p = new_max_p
        new_max_q = tl.maximum(max_q, y)
        rescale_q = exp_shifted(max_q, new_max_q)
        weight_q = exp_shifted(y, new_max_q)
        sum_q = sum_q * rescale_q + weight_q
        orphan = orphan * rescale_q + tl.where(represented, 0.0, weight_q)
        max_q = new_max_q
    row_max_p, total_p = merge_lanes(max_p, sum_p)
    _, total_cross = merge_lanes(max_p, cross)
    _, total_gap = merge_lanes(max_p, gap)
    row_max_q, total_q = merge_lanes(max_q, sum_q)
    _, total_orphan = merge_lanes(max_q, orphan)
    lse_p = row_max_p + tl.log(total_p)
    lse_q = row_max_q + tl.log(total_q)
    # log(Σe^y / Σe^x) − c = log1p(gap / S): accurate when p ≈ q (see the module docstring)
    gap_all = total_gap + tl.where(total_orphan > 0, total_orphan * tl.exp(row_max_q - shift - row_max_p), 0.0)
    kl_accurate = log1p(gap_all / total_p) - total_cross / total_p
    kl_plain = -total_cross / total_p - shift - lse_p + lse_q
    usable = (gap_all == gap_all) & (tl.abs(gap_all) < -NEG_INF) & (gap_all > -total_p)
    kl = tl.where(usable, kl_accurate, kl_plain)
    tl.store(kl_ptr + row, tl.where(active, kl, 0.0))
    tl.store(lse_p_ptr + row, tl.where(active, lse_p, 0.0))
    tl.store(lse_q_ptr + row, tl.where(active, lse_q, 0.0))


@triton.jit
def kl_backward_kernel(grad_kl_ptr, p_ptr, q_ptr, mask_ptr, lse_p_ptr, lse_q_ptr, kl_ptr,
                       grad_p_ptr, grad_q_ptr, V, stride_p, stride_q,
                       HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr):
    """∂logits_p, ∂logits_q [T, V] (the logits' dtype, contiguous) of Σ_t grad_kl[t]·KL_t;
    zeros on unselected rows."""
    row = tl.program_id(0).to(tl.int64)
    active = row_is_active(mask_ptr, row, HAS_MASK)
    grad = tl.load(grad_kl_ptr + row).to(tl.float32)
    lse_p = tl.load(lse_p_ptr + row)
    lse_q = tl.load(lse_q_ptr + row)
    kl = tl.load(kl_ptr + row)
    limit = tl.where(active, V, 0)               # unselected rows: nothing read, zeros written
    lanes = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        ok = cols < V
        x = tl.load(p_ptr + row * stride_p + cols, mask=cols < limit, other=NEG_INF).to(tl.float32)
        y = tl.load(q_ptr + row * stride_q + cols, mask=cols < limit, other=NEG_INF).to(tl.float32)
        prob_p = exp_shifted(x, lse_p)
        prob_q = exp_shifted(y, lse_q)
        diff = tl.where(prob_p > 0, (x - lse_p) - (y - lse_q), 0.0)
        grad_p = tl.where(active, grad * prob_p * (diff - kl), 0.0)
        grad_q = tl.where(active, grad * (prob_q - prob_p), 0.0)
        tl.store(grad_p_ptr + row * V + cols, grad_p.to(grad_p_ptr.dtype.element_ty), mask=ok)
        tl.store(grad_q_ptr + row * V + cols, grad_q.to(grad_q_ptr.dtype.element_ty), mask=ok)
