"""KL backend "triton": one program per row of logits (mlan_kernels/triton/kl_kernels.py).
Runs CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 (tests). Contract: mlan_kernels.dispatch."""
import torch
import triton

from ..triton.kl_kernels import kl_backward_kernel, kl_forward_kernel
from ..utils import interpreted


def _triton_block(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps): vocabulary chunks of up to 4096 on a GPU, of up to 128 in the
    interpreter (tests; it ignores num_warps)."""
    cap = 128 if interpreted(device) else 4096
    return min(cap, triton.next_power_of_2(vocab)), 8


def _mask_bytes(mask):
    """The [T] bool mask as the uint8 the kernels read: a view, no copy (None stays None)."""
    return None if mask is None else mask.contiguous().view(torch.uint8)


def forward(logits_p, logits_q, mask):
    total, vocab = logits_p.shape
    kl, lse_p, lse_q = (logits_p.new_empty(total, dtype=torch.float32) for _ in range(3))
    block, warps = _triton_block(vocab, logits_p.device)
    kl_forward_kernel[(total,)](logits_p, logits_q, _mask_bytes(mask), kl, lse_p, lse_q, vocab,
                                logits_p.stride(0), logits_q.stride(0), HAS_MASK=mask is not None,
                                BLOCK_V=block, num_warps=warps)
    return kl, lse_p, lse_q


def backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, inplace=False):
    total, vocab = logits_p.shape
    if inplace:              # each program loads a vocabulary block before storing over it
        grad_p, grad_q = logits_p, logits_q
    else:
        grad_p = torch.empty(total, vocab, dtype=logits_p.dtype, device=logits_p.device)
        grad_q = torch.empty(total, vocab, dtype=logits_q.dtype, device=logits_q.device)
    block, warps = _triton_block(vocab, logits_p.device)
    kl_backward_kernel[(total,)](grad_kl, logits_p, logits_q, _mask_bytes(mask), lse_p, lse_q, kl,
                                 grad_p, grad_q, vocab, logits_p.stride(0), logits_q.stride(0),
                                 grad_kl.stride(0), HAS_MASK=mask is not None, BLOCK_V=block,
                                 num_warps=warps)
    return grad_p, grad_q
