"""The `mlan::kl_div_logits` op: fused row-wise KL(p‖q) between two logit matrices.

    torch.ops.mlan.kl_div_logits(logits_p [T, V], logits_q [T, V], mask [T] bool | None,
                                 backend) -> (kl [T], lse_p [T], lse_q [T])      (compute dtype)
    torch.ops.mlan.kl_div_logits_backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl,
                                          backend) -> (grad_logits_p, grad_logits_q)

Backends: "triton" (CUDA; CPU only under TRITON_INTERPRET=1, for tests), "cpu" (the compiled
C++ kernels of csrc/cpu/kl_div_kernels.cpp: one row per task, SIMD exp; the CPU default for
fp32/bf16/fp16) and "chunked" (plain torch over blocks of rows, never more than `CHUNK_ROWS`·V
fp32 temporaries; the only fp64 path, and the fallback when the extension is not built).
`kl_div_logits` (the user API) applies the reduction and the eager / torch.compile split of
ops/mm_adapter.py: a plain autograd.Function eagerly, the registered
custom op (fake + autograd) while compiling.

The fused linear + KL op (logits computed chunk by chunk) is in ops/fused_linear_kl.py.
"""
import functools
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from ..dispatch import triton_interpreter, warn_once
from ..reference_kl import REDUCTIONS, compute_dtype, reduce_rows
from ._custom_op import choose_apply, eager_function

BACKENDS = ("auto", "triton", "cpu", "chunked")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK_ROWS = 64          # rows per block of the chunked path (measured: docs/commit_balance.md §8)
_warned = set()


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_block(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps): small chunks in the interpreter (tests), wide ones on GPU."""
    import triton
    if device.type != "cuda" or triton_interpreter():
        return min(128, triton.next_power_of_2(vocab)), 1
    return min(4096, triton.next_power_of_2(vocab)), 8


@functools.lru_cache(maxsize=None)
def cpu_kernels_unavailable() -> Optional[str]:
    """None when the compiled extension with the KL ops loads, else why not."""
    try:
        importlib.import_module("mlan_kernels._C")
    except ImportError as error:
        return (f"the compiled extension mlan_kernels._C does not load ({error}); build it with "
                "`pip install --no-build-isolation -e .`")
    if not hasattr(torch.ops.mlan_C, "kl_div_forward"):
        return "mlan_kernels._C was built before the KL kernels existed; rebuild it"
    return None


def _unavailable(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when `backend` ("triton" | "cpu") can run these logits, else why not."""
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu KL kernels need CPU tensors, got {device}"
        if dtype not in CPU_DTYPES:
            return f"cpu KL supports {CPU_DTYPES}, got {dtype}"
        return cpu_kernels_unavailable()
    if dtype not in TRITON_DTYPES:
        return f"triton KL supports {TRITON_DTYPES}, got {dtype}"
    if device.type != "cuda" and not triton_interpreter():
        return "triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing)"
    if not _triton_importable():
        return "triton is not installed"
    return None


def select_kl_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """The backend that runs logits on `device` with `dtype`: "auto" = "triton" on CUDA, the
    compiled "cpu" kernels on CPU, "chunked" for float64 or when those cannot run (with one
    warning saying why, as for an explicitly requested backend that cannot run)."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "chunked":
        return "chunked"
    wanted = requested if requested != "auto" else ("triton" if device.type == "cuda" else "cpu")
    reason = _unavailable(wanted, device, dtype)
    if reason is None:
        return wanted
    if requested != "auto" or dtype != torch.float64:    # float64 is chunked-only by design
        warn_once(f"mlan_kernels: KL backend {wanted!r} unavailable: {reason}; using 'chunked'", _warned)
    return "chunked"


def _row_blocks(total: int, mask: Optional[Tensor], block: int):
    """Index tensors (or slices) of the selected rows, `block` at a time."""
    if mask is None:
        return [slice(start, min(start + block, total)) for start in range(0, total, block)]
    selected = mask.nonzero().flatten()
    return [selected[start:start + block] for start in range(0, selected.numel(), block)]


def _chunked_forward(logits_p, logits_q, mask):
    """The cpu kernels' formula in torch ops (csrc/cpu/kl_div_kernels.h): with e = e^(x−max x),
    f = e^(y−max y), d = (x−max x) − (y−max y), KL = Σe·d/Σe + log1p(Σ(f − e)/Σe) with f − e as
    e·expm1(−d) where |d| < 0.5, which keeps its accuracy when p ≈ q, unlike log Σf − log Σe."""
    dtype = compute_dtype(logits_p.dtype)
    total = logits_p.shape[0]
    kl, lse_p, lse_q = (logits_p.new_zeros(total, dtype=dtype) for _ in range(3))
    for rows in _row_blocks(total, mask, CHUNK_ROWS):
        x, y = logits_p[rows].to(dtype), logits_q[rows].to(dtype)
        max_x, max_y = x.amax(-1, keepdim=True), y.amax(-1, keepdim=True)
        e, f = x - max_x, y - max_y                       # shifted logits, then their exps
        d = e - f
        e.exp_()
        f.exp_()
        supported = e > 0
        sum_e, sum_f = e.sum(-1), f.sum(-1)
        weighted = (e * d).masked_fill_(supported.logical_not(), 0.0).sum(-1)
        # Σ (f − e): e·expm1(−d) where |d| < 0.5 (there f − e would cancel), else f − e itself
        gap = torch.where(d.abs() < 0.5, d.neg().expm1_().mul_(e), f - e)
        differences = torch.where(supported, gap, f).sum(-1)
        kl[rows] = weighted / sum_e + torch.log1p(differences / sum_e)
        lse_p[rows], lse_q[rows] = max_x.squeeze(-1) + sum_e.log(), max_y.squeeze(-1) + sum_f.log()
    return kl, lse_p, lse_q


def _chunked_backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, inplace=False):
    dtype = compute_dtype(logits_p.dtype)
    if inplace:              # each block is read in full before its gradients are written
        grad_p, grad_q = logits_p, logits_q
    else:
        grad_p, grad_q = torch.zeros_like(logits_p), torch.zeros_like(logits_q)
    for rows in _row_blocks(logits_p.shape[0], mask, CHUNK_ROWS):
        # three [rows, V] blocks in the compute dtype, updated in place
        diff = logits_p[rows].to(dtype) - lse_p[rows, None]           # log p
        prob_q = logits_q[rows].to(dtype) - lse_q[rows, None]         # log q
        prob_p = diff.exp()
        diff.sub_(prob_q).masked_fill_(prob_p.gt(0).logical_not_(), 0.0)   # log p − log q where p > 0
        grad = grad_kl[rows, None].to(dtype)
        prob_q.exp_().sub_(prob_p).mul_(grad)                          # grad · (q − p)
        grad_p[rows] = diff.sub_(kl[rows, None]).mul_(prob_p).mul_(grad).to(grad_p.dtype)
        grad_q[rows] = prob_q.to(grad_q.dtype)
    return grad_p, grad_q


def _triton_forward(logits_p, logits_q, mask):
    from ..triton.kl_kernels import kl_forward_kernel
    total, vocab = logits_p.shape
    kl, lse_p, lse_q = (logits_p.new_empty(total, dtype=torch.float32) for _ in range(3))
    block, warps = _triton_block(vocab, logits_p.device)
    mask_u8 = None if mask is None else mask.to(torch.uint8)
    kl_forward_kernel[(total,)](logits_p, logits_q, mask_u8, kl, lse_p, lse_q, vocab,
                                logits_p.stride(0), logits_q.stride(0), HAS_MASK=mask is not None,
                                BLOCK_V=block, num_warps=warps)
    return kl, lse_p, lse_q


def _triton_backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, inplace=False):
    from ..triton.kl_kernels import kl_backward_kernel
    total, vocab = logits_p.shape
    if inplace:              # each program loads a vocabulary block before storing over it
        grad_p, grad_q = logits_p, logits_q
    else:
        grad_p = torch.empty(total, vocab, dtype=logits_p.dtype, device=logits_p.device)
        grad_q = torch.empty(total, vocab, dtype=logits_q.dtype, device=logits_q.device)
    block, warps = _triton_block(vocab, logits_p.device)
    mask_u8 = None if mask is None else mask.to(torch.uint8)
    kl_backward_kernel[(total,)](grad_kl.contiguous(), logits_p, logits_q, mask_u8, lse_p, lse_q,
                                 kl, grad_p, grad_q, vocab, logits_p.stride(0), logits_q.stride(0),
                                 HAS_MASK=mask is not None, BLOCK_V=block, num_warps=warps)
    return grad_p, grad_q


def _cpu_forward(logits_p, logits_q, mask):
    return torch.ops.mlan_C.kl_div_forward(logits_p, logits_q, mask)


def _cpu_backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, inplace=False):
    if inplace:
        torch.ops.mlan_C.kl_div_backward_inplace(grad_kl, logits_p, logits_q, lse_p, lse_q, kl)
        return logits_p, logits_q
    return torch.ops.mlan_C.kl_div_backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl)


_FORWARDS = {"triton": _triton_forward, "cpu": _cpu_forward, "chunked": _chunked_forward}
_BACKWARDS = {"triton": _triton_backward, "cpu": _cpu_backward, "chunked": _chunked_backward}


def _rows_contiguous(logits: Tensor) -> Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def kl_rows_forward(logits_p, logits_q, mask, backend="auto"):
    """(kl, lse_p, lse_q) [T] in the compute dtype of logits [T, V]; 0 on unselected rows."""
    if logits_p.shape[0] == 0 or logits_p.shape[1] == 0:
        zeros = logits_p.new_zeros(logits_p.shape[0], dtype=compute_dtype(logits_p.dtype))
        return zeros, zeros.clone(), zeros.clone()
    logits_p, logits_q = _rows_contiguous(logits_p), _rows_contiguous(logits_q)
    forward = _FORWARDS[select_kl_backend(logits_p.device, logits_p.dtype, backend)]
    return forward(logits_p, logits_q, mask)


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
    backward = _BACKWARDS[select_kl_backend(logits_p.device, logits_p.dtype, backend)]
    return backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, inplace=inplace)


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


def _setup_context(ctx, inputs, output):
    logits_p, logits_q, mask, backend = inputs
    kl, lse_p, lse_q = output
    ctx.mark_non_differentiable(lse_p, lse_q)
    ctx.save_for_backward(logits_p, logits_q, mask, lse_p, lse_q, kl)
    ctx.backend = backend
    ctx.traced = True


def _backward(ctx, grad_kl, _grad_lse_p, _grad_lse_q):
    logits_p, logits_q, mask, lse_p, lse_q, kl = ctx.saved_tensors
    backward = kl_div_logits_backward_op if ctx.traced else kl_rows_backward
    grad_p, grad_q = backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, ctx.backend)
    return grad_p, grad_q, None, None


kl_div_logits_op.register_autograd(_backward, setup_context=_setup_context)


_EagerKL = eager_function("_EagerKL", kl_rows_forward, _setup_context, _backward)


def validate_kl_args(logits_p, logits_q, mask, reduction, backend="auto", names=("logits_p", "logits_q")):
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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def kl_rows(logits_p: Tensor, logits_q: Tensor, mask: Optional[Tensor], backend: str) -> Tensor:
    """Differentiable per-row KL of flat logits [T, V] (mask [T] bool or None) -> [T]."""
    apply = choose_apply(kl_div_logits_op, _EagerKL)
    return apply(logits_p, logits_q, mask, backend)[0]


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
