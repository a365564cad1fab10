"""Compiled backends `cpu` and `cuda`: the C++/OpenMP and CUDA kernels of csrc/, as the ops
torch.ops.mlan_C.mm_adapter_forward / mm_adapter_backward of the extension `mlan_kernels._C`.

Same `forward`/`backward` contract as every MM-Adapter backend (mlan_kernels.dispatch). The ops validate their arguments
in C++ and pick the CPU or CUDA kernels by the tensors' device (torch's dispatcher). Importing
this module raises ImportError when the extension was not built; the dispatcher then falls back
to the reference backend with one warning that says how to build it.
"""
import importlib

import torch

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` (torch installed first; "
              "MLAN_SKIP_EXT=1 skips it on purpose)")

try:
    _C = importlib.import_module("mlan_kernels._C")
except ImportError as error:
    raise ImportError(f"the compiled extension mlan_kernels._C is not built or does not load "
                      f"({error}); {BUILD_HINT}") from error

def supports(name, device, dtype):
    """None when backend `name` ("cpu" | "cuda") can run tensors of this device/dtype, else why
    not (the registry checked the dtypes and devices)."""
    if name == "cuda" and not _C.cuda_compiled:
        return ("mlan_kernels._C was built without its CUDA kernels (no CUDA torch or nvcc at "
                f"build time, or MLAN_SKIP_CUDA=1); {BUILD_HINT} on a machine with nvcc")
    return None


_forward = torch.ops.mlan_C.mm_adapter_forward.default
_backward = torch.ops.mlan_C.mm_adapter_backward.default


def _seed_tensor(seed, x):
    """The dropout seed as the compiled ops take it: a 1-element int64 tensor on x's device (None
    stays None: no dropout). The ops hand its data pointer to the kernels, which read it there
    (the CUDA kernels from device memory), so nothing reads it on the host. A tensor already
    int64 on x's device passes unchanged; an int (the backend contract allows one) becomes a
    tensor, a host-to-device copy on GPU."""
    if seed is None:
        return None
    if isinstance(seed, torch.Tensor):
        return seed.to(device=x.device, dtype=torch.int64)
    return torch.tensor(int(seed), dtype=torch.int64, device=x.device)


def forward(x, down_weight, down_bias, up_weight, up_bias, routing_weights, scale, dropout_p, seed,
            groups, single_modality):
    """x [B, L, D], routing_weights [B, E] -> (y [B, L, D] in x.dtype, h [B, L, r] fp32 (fp64 for
    fp64 x), the post-dropout hidden); the compiled op validates its arguments."""
    return _forward(x, down_weight, down_bias, up_weight, up_bias, routing_weights, scale,
                    dropout_p, _seed_tensor(seed, x), groups, single_modality)


def backward(grad_y, x, h, routing_weights, down_weight, down_bias, up_weight, up_bias, scale,
             dropout_p, seed, groups):
    """-> (grad_x [B, L, D] without the router term, grad_down_weight, grad_down_bias,
    grad_up_weight, grad_up_bias in their parameters' dtypes, grad_routing_weights [B, E])."""
    return _backward(grad_y, x, h, routing_weights, down_weight, down_bias, up_weight, up_bias,
                     scale, dropout_p, _seed_tensor(seed, x), groups)
