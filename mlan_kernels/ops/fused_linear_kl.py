"""The `mlan::fused_linear_kl` op: KL of two LM-head outputs without full [T, V] logits.

    torch.ops.mlan.fused_linear_kl(hidden_p [T, H], hidden_q [T, H], weight [V, H], chunk_size,
                                   backend) -> (kl [T], lse_p [T], lse_q [T])      (compute dtype)
    torch.ops.mlan.fused_linear_kl_backward(grad_kl, hidden_p, hidden_q, weight, lse_p, lse_q,
                                            kl, chunk_size, backend) -> (∂hidden_p, ∂hidden_q, ∂weight)

Like Liger's fused linear cross-entropy: tokens go chunk_size at a time; both sides' logits of a
chunk come from one GEMM into one [2·chunk, V] buffer; the backward recomputes that buffer,
overwrites it with the KL gradients (kl_rows_backward(inplace=True)), and reads it twice: for
∂hidden (one GEMM straight into the output rows) and for ∂weight, accumulated in fp32. When
the weight is fp32 the accumulation is one in-place addmm; for bf16/fp16 weights the partial
product goes through a [WEIGHT_GRAD_BLOCK, H] temporary per block of vocabulary rows.

Peak extra memory of the backward, beyond its inputs and outputs: 2·chunk·V logits (weight
dtype) + V·H fp32 accumulator + WEIGHT_GRAD_BLOCK·H (weight dtype) + 2·chunk·H (+ the chunked
backend's fp32 blocks). The row KL math (lse, gradients) is ops/kl_div.py's: backend "triton",
"cpu" or "chunked".
"""
from typing import Optional

import torch
from torch import Tensor

from ..functional import compute_dtype, reduce_rows
from .kl_div import kl_rows_backward, kl_rows_forward, validate_kl_args

WEIGHT_GRAD_BLOCK = 4096    # vocabulary rows per ∂weight partial product (bf16/fp16 weights)
MIN_AUTO_CHUNK = 64         # smallest automatic chunk: keeps each GEMM at least 64 rows tall


def auto_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk when chunk_size=None (tokens = T, all rows of hidden_p, before masking).

    Liger's rule: one chunk's [chunk, V] logits about the size of the [T, H] hidden states, i.e.
    the next power of 2 of T / ceil(V / H), and at least MIN_AUTO_CHUNK.
    E.g. T=4096, H=512, V=32000 -> 128; T=8192, H=4096, V=32000 -> 1024."""
    target = -(-tokens // -(-vocab // max(hidden, 1)))
    chunk = MIN_AUTO_CHUNK
    while chunk < target:
        chunk *= 2
    return chunk


def _token_chunks(total: int, chunk_size: int):
    return [slice(start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]


def _both_sides(hidden_p, hidden_q, rows):
    """[2n, H]: the chunk's rows of hidden_p, then the same rows of hidden_q."""
    return torch.cat([hidden_p[rows], hidden_q[rows]])


def fused_linear_kl_forward(hidden_p, hidden_q, weight, chunk_size, backend="auto"):
    """(kl, lse_p, lse_q) [T] of logits hidden_{p,q} [T, H] · weight [V, H]ᵀ, chunk by chunk."""
    dtype = compute_dtype(hidden_p.dtype)
    outputs = [hidden_p.new_zeros(hidden_p.shape[0], dtype=dtype) for _ in range(3)]
    for rows in _token_chunks(hidden_p.shape[0], chunk_size):
        logits = _both_sides(hidden_p, hidden_q, rows) @ weight.t()            # [2n, V]
        half = logits.shape[0] // 2
        for out, value in zip(outputs, kl_rows_forward(logits[:half], logits[half:], None, backend)):
            out[rows] = value
        del logits
    return tuple(outputs)


def _accumulate_weight_grad(grad_weight, grad_logits, inputs):
    """grad_weight [V, H] (fp32/fp64) += grad_logitsᵀ [V, N] · inputs [N, H] (weight dtype)."""
    if grad_weight.dtype == grad_logits.dtype:
        grad_weight.addmm_(grad_logits.t(), inputs)
        return
    for start in range(0, grad_weight.shape[0], WEIGHT_GRAD_BLOCK):
        block = slice(start, start + WEIGHT_GRAD_BLOCK)
        grad_weight[block] += grad_logits[:, block].t() @ inputs


def fused_linear_kl_backward(grad_kl, hidden_p, hidden_q, weight, lse_p, lse_q, kl, chunk_size,
                             backend):
    """(∂hidden_p, ∂hidden_q, ∂weight): logits recomputed per chunk, ∂weight accumulated in fp32."""
    grad_hidden_p, grad_hidden_q = (torch.empty_like(h, memory_format=torch.contiguous_format)
                                    for h in (hidden_p, hidden_q))     # mm(out=rows) needs dense rows
    grad_weight = torch.zeros_like(weight, dtype=compute_dtype(weight.dtype))
    for rows in _token_chunks(hidden_p.shape[0], chunk_size):
        inputs = _both_sides(hidden_p, hidden_q, rows)                           # [2n, H]
        grad_logits = inputs @ weight.t()                                        # logits, then ∂logits
        half = inputs.shape[0] // 2
        kl_rows_backward(grad_kl[rows], grad_logits[:half], grad_logits[half:], None,
                         lse_p[rows], lse_q[rows], kl[rows], backend, inplace=True)
        torch.mm(grad_logits[:half], weight, out=grad_hidden_p[rows])
        torch.mm(grad_logits[half:], weight, out=grad_hidden_q[rows])
        _accumulate_weight_grad(grad_weight, grad_logits, inputs)
        del grad_logits
    return grad_hidden_p, grad_hidden_q, grad_weight.to(weight.dtype)


@torch.library.custom_op("mlan::fused_linear_kl", mutates_args=())
def fused_linear_kl_op(hidden_p: Tensor, hidden_q: Tensor, weight: Tensor, chunk_size: int,
                       backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    return fused_linear_kl_forward(hidden_p, hidden_q, weight, chunk_size, backend)


@fused_linear_kl_op.register_fake
def _(hidden_p, hidden_q, weight, chunk_size, backend="auto"):
    rows = hidden_p.new_empty(hidden_p.shape[0], dtype=compute_dtype(hidden_p.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.custom_op("mlan::fused_linear_kl_backward", mutates_args=())
def fused_linear_kl_backward_op(grad_kl: Tensor, hidden_p: Tensor, hidden_q: Tensor, weight: Tensor,
                                lse_p: Tensor, lse_q: Tensor, kl: Tensor, chunk_size: int,
                                backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    return fused_linear_kl_backward(grad_kl, hidden_p, hidden_q, weight, lse_p, lse_q, kl,
                                    chunk_size, backend)


@fused_linear_kl_backward_op.register_fake
def _(grad_kl, hidden_p, hidden_q, weight, lse_p, lse_q, kl, chunk_size, backend="auto"):
    dense = torch.contiguous_format
    return (torch.empty_like(hidden_p, memory_format=dense),
            torch.empty_like(hidden_q, memory_format=dense), torch.empty_like(weight))


class FusedLinearKLFunction(torch.autograd.Function):
    """The op's one autograd path, eager and under torch.compile. With logits_{p,q} = hidden_{p,q} Wᵀ
    and ∂logits from the KL row formulas (ops/kl_div.py), chunk by chunk:
        ∂hidden_p = ∂logits_p W,  ∂hidden_q = ∂logits_q W,  ∂W = ∂logits_pᵀ hidden_p + ∂logits_qᵀ hidden_q
    """

    @staticmethod
    def forward(ctx, hidden_p, hidden_q, weight, chunk_size, backend):
        kl, lse_p, lse_q = torch.ops.mlan.fused_linear_kl.default(hidden_p, hidden_q, weight,
                                                                  chunk_size, backend)
        ctx.mark_non_differentiable(lse_p, lse_q)
        ctx.set_materialize_grads(False)    # no zero-filled gradients for lse_p, lse_q
        ctx.save_for_backward(hidden_p, hidden_q, weight, lse_p, lse_q, kl)
        ctx.hyper = (chunk_size, backend)
        return kl, lse_p, lse_q

    @staticmethod
    def backward(ctx, grad_kl, _grad_lse_p, _grad_lse_q):
        if grad_kl is None:                 # kl unused: no gradient (grads are not materialized)
            return None, None, None, None, None
        grads = torch.ops.mlan.fused_linear_kl_backward.default(grad_kl.contiguous(),
                                                                *ctx.saved_tensors, *ctx.hyper)
        return (*grads, None, None)


def fused_linear_kl(hidden_p: Tensor, hidden_q: Tensor, lm_head_weight: Tensor,
                    mask: Optional[Tensor] = None, reduction: str = "batchmean",
                    chunk_size: Optional[int] = None, backend: str = "auto") -> Tensor:
    """KL(softmax(hidden_p Wᵀ) ‖ softmax(hidden_q Wᵀ)) per token without full [T, V] logits.

    hidden_p, hidden_q: [..., H] (same shape/dtype); lm_head_weight W: [V, H] in their dtype;
    mask: [...] bool (tokens to include; the others are dropped before any GEMM);
    chunk_size: tokens per chunk (None: auto_chunk_size(T, H, V)). Extra memory beyond inputs and
    outputs is 2·chunk_size·V logits in the weight dtype plus, in the backward, a V·H fp32 ∂weight
    accumulator (the backward recomputes each chunk's logits; see the module docstring).
    Differentiable w.r.t. all three tensors.
    Returns what kl_div_logits(hidden_p Wᵀ, hidden_q Wᵀ, mask, reduction) returns.
    """
    validate_kl_args(hidden_p, hidden_q, mask, reduction, backend, names=("hidden_p", "hidden_q"))
    if not isinstance(lm_head_weight, Tensor) or lm_head_weight.dim() != 2:
        got = (list(lm_head_weight.shape) if isinstance(lm_head_weight, Tensor)
               else type(lm_head_weight).__name__)
        raise ValueError(f"lm_head_weight must be a [V, H] tensor, got {got}")
    if hidden_p.shape[-1:] != lm_head_weight.shape[1:]:
        raise ValueError(f"hidden_p must be [..., H] with H = lm_head_weight.shape[1] = "
                         f"{lm_head_weight.shape[1]}, got {list(hidden_p.shape)}")
    if lm_head_weight.dtype != hidden_p.dtype or lm_head_weight.device != hidden_p.device:
        raise TypeError(f"lm_head_weight must match hidden_p's dtype/device ({hidden_p.dtype}, "
                        f"{hidden_p.device}), got ({lm_head_weight.dtype}, {lm_head_weight.device})")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    width = hidden_p.shape[-1]
    if chunk_size is None:
        chunk_size = auto_chunk_size(hidden_p.numel() // max(width, 1), width, lm_head_weight.shape[0])
    flat_p, flat_q = hidden_p.reshape(-1, width), hidden_q.reshape(-1, width)
    flat_mask = None if mask is None else mask.reshape(-1).to(device=hidden_p.device, dtype=torch.bool)
    if flat_mask is not None:
        flat_p, flat_q = flat_p[flat_mask], flat_q[flat_mask]
    rows = FusedLinearKLFunction.apply(flat_p, flat_q, lm_head_weight, chunk_size, backend)[0]
    if flat_mask is not None:
        rows = rows.new_zeros(flat_mask.shape[0]).masked_scatter(flat_mask, rows)
    out = reduce_rows(rows, flat_mask, reduction)
    return out.reshape(hidden_p.shape[:-1]) if reduction == "none" else out
