"""KL backend "cpu": the compiled C++ kernels of csrc/cpu/kl_div_kernels.cpp (one row per
task, SIMD exp), as torch.ops.mlan_C.kl_div_* of the extension mlan_kernels._C. Importing this
module raises ImportError when the extension is not built or predates the KL kernels; the
registry then falls back to "chunked" with one warning. Contract: mlan_kernels.dispatch."""
import importlib

import torch

from .compiled import BUILD_HINT

try:
    importlib.import_module("mlan_kernels._C")
except ImportError as error:
    raise ImportError(f"the compiled extension mlan_kernels._C does not load ({error}); "
                      f"{BUILD_HINT}") from error
if not hasattr(torch.ops.mlan_C, "kl_div_forward"):
    raise ImportError("mlan_kernels._C was built before the KL kernels existed; rebuild it")


def forward(logits_p, logits_q, mask):
    return torch.ops.mlan_C.kl_div_forward(logits_p, logits_q, mask)


def backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl, inplace=False):
    if inplace:
        torch.ops.mlan_C.kl_div_backward_inplace(grad_kl, logits_p, logits_q, lse_p, lse_q, kl)
        return logits_p, logits_q
    return torch.ops.mlan_C.kl_div_backward(grad_kl, logits_p, logits_q, mask, lse_p, lse_q, kl)
