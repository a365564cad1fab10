"""Minimum bytes each benchmarked op must move through memory: the roofline numerator.

Achieved bandwidth = min_bytes / time; "% of copy" divides it by the bandwidth of a plain
`y.copy_(x)` (2 · numel · element size bytes) measured in the same run (docs/performance.md).
Weights that are tiny next to the activations (the adapter's r·D, the router) are left out.
`element` is the element size in bytes of the op's activations (x, logits, hidden, grads).
"""
FP32 = 4


def copy_bytes(numel, element):
    """y.copy_(x): read x, write y."""
    return 2 * numel * element


def mm_adapter_bytes(phase, tokens, dim, rank, element):
    """MM-Adapter, x [N, D] (N = B·L tokens), hidden H [N, r] kept in fp32 for backward.
    fwd: read x, write y (2·N·D) + write H (N·r fp32).
    bwd: read ∂y and x, write ∂x (3·N·D) + read H (N·r fp32).
    fwd+bwd: the sum, 5·N·D + 2·N·r."""
    per_phase = {"fwd": (2, 1), "bwd": (3, 1), "fwd+bwd": (5, 2)}
    activations, hidden = per_phase[phase]
    return activations * tokens * dim * element + hidden * tokens * rank * FP32


def kl_div_bytes(phase, tokens, vocab, element):
    """Row-wise KL of logits p, q [T, V].
    fwd: read both logits once (2·T·V); the per-row outputs are negligible.
    bwd: read both logits, write both gradients (4·T·V).
    fwd+bwd: the sum (6·T·V): the backward needs the forward's log-sum-exps, so one fused
    pass cannot do less than reading the logits twice."""
    return {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[phase] * tokens * vocab * element


def fused_linear_kl_bytes(phase, tokens, hidden, vocab, element):
    """KL of logits h_p Wᵀ, h_q Wᵀ without materializing them: h_p, h_q [T, H], W [V, H].
    fwd: read both hidden states and the weight once (2·T·H + V·H).
    bwd: read them again and write their gradients (2·(2·T·H + V·H)).
    fwd+bwd: the sum, 3·(2·T·H + V·H). (The op is compute-bound at LM-head sizes; the
    number says how far it is from the memory floor, not from its own roofline.)"""
    return {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[phase] * (2 * tokens * hidden + vocab * hidden) * element


def scale_grads_bytes(numel, element):
    """Per-group norm + clip + multiplier over P gradient elements: read all for the norms,
    then read and write all to scale (3·P)."""
    return 3 * numel * element
