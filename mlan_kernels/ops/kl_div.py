"""The `mlan::kl_div_logits` op: fused row-wise KL(p‖q) between two logit matrices.

    torch.ops.mlan.kl_div_logits(logits_p [T, V], logits_q [T, V], mask [T] bool | None,
                                 backend) -> (kl [T], lse_p [T], lse_q [T])      (compute dtype)
    torch.ops.mlan.kl_div_logits_backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl,
                                          backend) -> (grad_logits_p, grad_logits_q)

Backends (registry: mlan_kernels.dispatch, op "kl_div"; modules backends/kl_*.py): "triton"
(CUDA; CPU only under TRITON_INTERPRET=1, for tests), "cpu" (the compiled C++ kernels; the CPU
default for fp32/bf16/fp16) and "chunked" (plain torch over blocks of rows; the only fp64 path,
and the fallback when the others cannot run). `kl_div_logits` (the user API) applies the
reduction; KLDivFunction is the one autograd path, eager and compiled.

The fused linear + KL op (logits computed chunk by chunk) is in ops/fused_linear_kl.py.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from ..functional import REDUCTIONS, compute_dtype, reduce_rows


def _backend(logits: Tensor, requested: str):
    """The module of the KL backend that runs these logits."""
    return dispatch.get_backend(dispatch.select_backend(logits.device, logits.dtype, requested,
                                                        op="kl_div"), op="kl_div")


def _rows_contiguous(logits: Tensor) -> Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def kl_rows_forward(logits_p, logits_q, mask, backend="auto"):
    """(kl, lse_p, lse_q) [T] in the compute dtype of logits [T, V]; 0 on unselected rows."""
    if logits_p.shape[0] == 0 or logits_p.shape[1] == 0:
        zeros = logits_p.new_zeros(logits_p.shape[0], dtype=compute_dtype(logits_p.dtype))
        return zeros, zeros.clone(), zeros.clone()
    logits_p, logits_q = _rows_contiguous(logits_p), _rows_contiguous(logits_q)
    return _backend(logits_p, backend).forward(logits_p, logits_q, mask)


def kl_rows_backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, backend="auto",
                     inplace=False):
    """(∂logits_p, ∂logits_q) [T, V] in the logits' dtypes of Σ_t grad_kl[t]·KL_t.

    inplace=True writes the gradients over logits_p and logits_q (which must be contiguous, with
    mask None: every row is overwritten) and returns them: no [T, V] allocation at all.
    """
    if inplace and (mask is not None or not (logits_p.is_contiguous() and logits_q.is_contiguous())):
        raise ValueError("inplace=True needs contiguous logits and mask=None")
    if logits_p.numel() == 0:
        return ((logits_p, logits_q) if inplace
                else (torch.zeros_like(logits_p), torch.zeros_like(logits_q)))
    logits_p, logits_q = _rows_contiguous(logits_p), _rows_contiguous(logits_q)
    return _backend(logits_p, backend).backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q,
                                                kl, inplace=inplace)


@torch.library.custom_op("mlan::kl_div_logits", mutates_args=())
def kl_div_logits_op(logits_p: Tensor, logits_q: Tensor, mask: Optional[Tensor],
                     backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    return kl_rows_forward(logits_p, logits_q, mask, backend)


@kl_div_logits_op.register_fake
def _(logits_p, logits_q, mask, backend="auto"):
    rows = logits_p.new_empty(logits_p.shape[0], dtype=compute_dtype(logits_p.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.custom_op("mlan::kl_div_logits_backward", mutates_args=())
def kl_div_logits_backward_op(grad_kl: Tensor, logits_p: Tensor, logits_q: Tensor,
                              mask: Optional[Tensor], lse_p: Tensor, lse_q: Tensor, kl: Tensor,
                              backend: str = "auto") -> tuple[Tensor, Tensor]:
    return kl_rows_backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, backend)


@kl_div_logits_backward_op.register_fake
def _(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, backend="auto"):
    return (torch.empty_like(logits_p, memory_format=torch.contiguous_format),
            torch.empty_like(logits_q, memory_format=torch.contiguous_format))


class KLDivFunction(torch.autograd.Function):
    """The op's one autograd path, eager and under torch.compile (the custom ops are opaque
    nodes with fakes there). Per row t, with p = softmax(logits_p), q = softmax(logits_q):
        KL_t = Σ_v p_v (log p_v − log q_v)
        ∂/∂logits_p[t, v] = g_t · p_v (log p_v − log q_v − KL_t);  ∂/∂logits_q[t, v] = g_t · (q_v − p_v)
    """

    @staticmethod
    def forward(ctx, logits_p, logits_q, mask, backend):
        kl, lse_p, lse_q = torch.ops.mlan.kl_div_logits.default(logits_p, logits_q, mask, backend)
        ctx.mark_non_differentiable(lse_p, lse_q)
        ctx.set_materialize_grads(False)    # no zero-filled gradients for lse_p, lse_q
        ctx.save_for_backward(logits_p, logits_q, mask, lse_p, lse_q, kl)
        ctx.backend = backend
        return kl, lse_p, lse_q

    @staticmethod
    def backward(ctx, grad_kl, _grad_lse_p, _grad_lse_q):
        if grad_kl is None:                 # kl unused: no gradient (grads are not materialized)
            return None, None, None, None
        logits_p, logits_q, mask, lse_p, lse_q, kl = ctx.saved_tensors
        grad_p, grad_q = torch.ops.mlan.kl_div_logits_backward.default(
            grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, ctx.backend)
        return grad_p, grad_q, None, None


def validate_kl_args(logits_p, logits_q, mask, reduction, backend, names=("logits_p", "logits_q")):
    """Raise TypeError/ValueError naming the bad argument (`names`: how the caller calls p, q)."""
    name_p, name_q = names
    for name, value in ((name_p, logits_p), (name_q, logits_q)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor [..., V], got "
                            f"{type(value).__name__ if not isinstance(value, Tensor) else value.dtype}")
        if value.dim() < 1:
            raise ValueError(f"{name} must have a last (vocabulary or hidden) dim, got a 0-d tensor")
    if logits_q.shape != logits_p.shape:
        raise ValueError(f"{name_q} must have {name_p}'s shape {list(logits_p.shape)}, "
                         f"got {list(logits_q.shape)}")
    if logits_q.dtype != logits_p.dtype or logits_q.device != logits_p.device:
        raise TypeError(f"{name_q} must match {name_p}'s dtype/device ({logits_p.dtype}, "
                        f"{logits_p.device}), got ({logits_q.dtype}, {logits_q.device})")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != logits_p.shape[:-1]):
        raise ValueError(f"mask must be a tensor of shape {list(logits_p.shape[:-1])} "
                         f"({name_p} without its last dim), got "
                         f"{list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r} "
                         f"('mean' is not accepted: F.kl_div's 'mean' divides by T·V)")
    dispatch.check_name(backend, op="kl_div")


def kl_rows(logits_p: Tensor, logits_q: Tensor, mask: Optional[Tensor], backend: str) -> Tensor:
    """Differentiable per-row KL of flat logits [T, V] (mask [T] bool or None) -> [T], 0 on
    unselected rows (never read)."""
    return KLDivFunction.apply(logits_p, logits_q, mask, backend)[0]


def kl_div_logits(logits_p: Tensor, logits_q: Tensor, mask: Optional[Tensor] = None,
                  reduction: str = "batchmean", backend: str = "auto") -> Tensor:
    """KL(softmax(logits_p) ‖ softmax(logits_q)) per row of the last dim, fused.

    logits_p, logits_q: [..., V] fp32/fp16/bf16 (fp64: chunked backend), same shape/dtype;
    mask: [...] bool, rows to include (e.g. answer tokens), None = all. Accumulation is fp32.
    reduction: "batchmean" (mean over selected rows) | "sum" | "none" ([...], 0 where masked).
    Equals F.kl_div(log_softmax(logits_q), log_softmax(logits_p), log_target=True) summed over
    V; differentiable w.r.t. both logits (gradients in the logits' dtype). −inf logits are
    allowed (p = 0 entries contribute 0; q = 0 where p > 0 gives +inf, as the math says).
    Returns a scalar (or [...] for "none") in the compute dtype (fp32, fp64 for fp64 logits).
    """
    validate_kl_args(logits_p, logits_q, mask, reduction, backend)
    vocab = logits_p.shape[-1]
    flat_mask = None if mask is None else mask.reshape(-1).to(device=logits_p.device, dtype=torch.bool)
    rows = kl_rows(logits_p.reshape(-1, vocab), logits_q.reshape(-1, vocab), flat_mask, backend)
    out = reduce_rows(rows, flat_mask, reduction)
    return out.reshape(logits_p.shape[:-1]) if reduction == "none" else out
