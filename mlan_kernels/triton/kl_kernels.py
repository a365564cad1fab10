"""Triton kernels of the fused row-wise KL(p‖q) between two logit matrices [T, V].

One program per row t. The forward walks the vocabulary once in BLOCK_V chunks and keeps, per
lane j of the chunk, online log-sum-exp state for BOTH rows (fp32, whatever the logits' dtype):
    m_p, s_p = running max and Σ exp(x − m_p) of logits_p        (x = logits_p[t, v])
    a        = Σ exp(x − m_p) · (x − y)                            (y = logits_q[t, v])
    m_q, s_q = the same for logits_q
and merges the lanes at the end:  lse = M + log Σ_j s_j e^{m_j − M},
    KL_t = Σ_v p_v (x_v − y_v) − lse_p + lse_q = A / S_p − lse_p + lse_q.
So each logit is read once (2·V elements per row) and nothing of size V is written.
Entries with x = −inf have p_v = 0 and contribute nothing (never 0·inf = nan); rows that the
mask leaves out are not read at all (KL_t = 0, lse = 0).

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
        cols = start + lanes
        ok = cols < V
        x = tl.load(p_ptr + row * stride_p + cols, mask=ok, other=NEG_INF).to(tl.float32)
        y = tl.load(q_ptr + row * stride_q + cols, mask=ok, other=NEG_INF).to(tl.float32)
        new_max_p = tl.maximum(max_p, x)
        rescale = exp_shifted(max_p, new_max_p)
        weight = exp_shifted(x, new_max_p)
        sum_p = sum_p * rescale + weight
        cross = cross * rescale + tl.where(weight > 0, weight * (x - y), 0.0)
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
