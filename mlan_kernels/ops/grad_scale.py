"""Per-group gradient norm, clipping and multiplier in a few multi-tensor launches.

    norms = scale_grads_(groups, multipliers, max_norm=None)
For group i: norm_i = ‖all grads of group i‖₂ (fp32), clip_i = min(1, max_norm / (norm_i + eps)),
every grad of the group *= multipliers[i] · clip_i, in place. Returns the pre-scaling norms [G].
The oracle is reference_kl.scale_grads_reference (a Python loop over parameters).

backend="foreach" (the default, CPU and GPU; "auto" means it until GPU measurements say
otherwise): torch._foreach_norm over all grads (multi-tensor launches per (device, dtype)
bucket), then per group: the norm of its per-tensor norms, the clip factor as a 0-d device
tensor, and one torch._foreach_mul_. No value is copied between host and device (no sync);
the only per-parameter Python work is collecting `.grad`.
backend="triton": two multi-tensor launches per dtype for ALL groups together
(triton/grad_scale_kernels.py: sum of squares per block, then scale), plus a few [G]-sized
torch ops; the block tables are cached per parameter set (shapes and groups), the address
table per set of grad addresses, so a training loop uploads nothing after the first step
while its grads keep their storage. Tested under
the Triton interpreter on CPU; not yet measured on a GPU.

For SGD-family optimizers and per-group clipping only: Adam/AdamW ignore a constant gradient
scale per tensor, so balance multipliers for them go through the LR (training/scheduler.py).
"""
import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..dispatch import triton_interpreter

BACKENDS = ("auto", "foreach", "triton")


def _collect(groups):
    """Per group, the .grad of every parameter that has one."""
    return [[param.grad for param in params if param.grad is not None] for params in groups]


@functools.lru_cache(maxsize=16)
def _layout_tables(device: torch.device, block: int, numels: tuple, owners: tuple):
    """int64 tables on `device` that depend only on the parameter set's shapes, cached per set
    (built and uploaded once, not per call): numel, group [N]; block_tensor, block_start,
    block_group [NB] (see triton/grad_scale_kernels.py)."""
    numel = torch.tensor(numels, dtype=torch.int64)
    counts = (numel + block - 1) // block
    block_tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_block = torch.cumsum(counts, 0) - counts
    block_start = (torch.arange(block_tensor.numel()) - first_block[block_tensor]) * block
    owner = torch.tensor(owners, dtype=torch.int64)
    return _to_device(dict(numel=numel, group=owner, block_tensor=block_tensor,
                           block_start=block_start, block_group=owner[block_tensor]), device)


@functools.lru_cache(maxsize=16)
def _address_table(device: torch.device, addresses: tuple):
    """int64 [N] grad addresses on `device`, cached: grads kept between steps (or re-allocated
    at the same addresses by the caching allocator) are not uploaded again."""
    return _to_device({"address": torch.tensor(addresses, dtype=torch.int64)}, device)["address"]


def _to_device(tables, device):
    if device.type == "cuda":
        return {key: value.pin_memory().to(device, non_blocking=True) for key, value in tables.items()}
    return tables


def _block_table(grads, owners, block):
    """The kernels' tables for `grads` (owners: each grad's group index): address [N] plus the
    cached layout tables of _layout_tables."""
    device = grads[0].device
    tables = dict(_layout_tables(device, block, tuple(grad.numel() for grad in grads), tuple(owners)))
    tables["address"] = _address_table(device, tuple(grad.data_ptr() for grad in grads))
    return tables


def _scale_triton(per_group, multipliers, max_norm, eps):
    """The multi-tensor Triton path of scale_grads_ (see the module docstring)."""
    import triton.language as tl
    from ..triton.grad_scale_kernels import scale_kernel, sum_squares_kernel
    triton_dtypes = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    device = next(grad for group in per_group for grad in group).device
    interpreted = device.type != "cuda" or triton_interpreter()
    block, warps = (64, 1) if interpreted else (2048, 4)
    buckets = {}
    for index, group in enumerate(per_group):
        for grad in group:
            if grad.dtype not in triton_dtypes or not grad.is_contiguous():
                raise ValueError(f"backend='triton' needs contiguous {tuple(triton_dtypes)} grads, "
                                 f"got {grad.dtype} (contiguous={grad.is_contiguous()})")
            buckets.setdefault(grad.dtype, ([], []))
            buckets[grad.dtype][0].append(grad)
            buckets[grad.dtype][1].append(index)
    sums = torch.zeros(len(per_group), dtype=torch.float32, device=device)
    launches = []
    for dtype, (grads, owners) in buckets.items():
        tables = _block_table(grads, owners, block)
        blocks = tables["block_tensor"].numel()
        if blocks == 0:
            continue
        args = (tables["address"], tables["numel"], tables["block_tensor"], tables["block_start"])
        partial = torch.empty(blocks, dtype=torch.float32, device=device)
        sum_squares_kernel[(blocks,)](*args, partial, DTYPE=triton_dtypes[dtype], BLOCK=block, num_warps=warps)
        sums.index_add_(0, tables["block_group"], partial)
        launches.append((blocks, args, tables["group"], triton_dtypes[dtype]))
    norms = sums.sqrt()
    factors = torch.tensor([float(m) for m in multipliers], dtype=torch.float32)
    factors = factors.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else factors
    if max_norm is not None:
        factors = factors * (max_norm / (norms + eps)).clamp(max=1.0)
    for blocks, args, groups, dtype in launches:
        scale_kernel[(blocks,)](*args, groups, factors, DTYPE=dtype, BLOCK=block, num_warps=warps)
    return norms


def _check(groups, multipliers, max_norm):
    if isinstance(groups, Tensor) or not isinstance(groups, Sequence):
        raise TypeError("groups must be a sequence of parameter sequences")
    if len(multipliers) != len(groups):
        raise ValueError(f"multipliers must have one value per group ({len(groups)}), got {len(multipliers)}")
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0 or None, got {max_norm!r}")


@torch.no_grad()
def scale_grads_(groups: Sequence[Sequence[Tensor]], multipliers: Sequence[float],
                 max_norm: Optional[float] = None, eps: float = 1e-6, backend: str = "auto") -> Tensor:
    """Scale every group's gradients in place by multiplier · clip factor; see module doc.

    groups: G sequences of parameters (their `.grad` is used; parameters without one are
    skipped; all grads on one device); multipliers: G floats; max_norm: per-group clip threshold or
    None; backend: "auto" (= "foreach") | "foreach" | "triton". Returns the per-group gradient
    norms before scaling: [G] fp32 on the grads' device.
    """
    _check(groups, multipliers, max_norm)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    per_group = _collect(groups)
    grads = [grad for group in per_group for grad in group]
    if not grads:
        return torch.zeros(len(groups))
    if backend == "triton":
        return _scale_triton(per_group, multipliers, max_norm, eps)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)      # fp32 even for 16-bit grads
    group_norms, start = [], 0
    for group, multiplier in zip(per_group, multipliers):
        if not group:
            group_norms.append(torch.zeros((), device=grads[0].device))
            continue
        norm = torch.linalg.vector_norm(torch.stack(norms[start:start + len(group)]))
        start += len(group)
        if max_norm is None:
            torch._foreach_mul_(group, float(multiplier))
        else:
            torch._foreach_mul_(group, (max_norm / (norm + eps)).clamp(max=1.0) * float(multiplier))
        group_norms.append(norm)
    return torch.stack(group_norms)
