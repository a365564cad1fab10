"""Grad-scaling backend "triton": two multi-tensor launches per dtype for ALL groups together
(triton/grad_scale_kernels.py: sum of squares per block, then scale), plus a few [G]-sized torch
ops. The block tables are cached per parameter set (shapes and groups), the address table per
set of grad addresses, so a training loop uploads nothing after the first step while its grads
keep their storage. Tested under the Triton interpreter on CPU; not yet measured on a GPU.
Contract: mlan_kernels.dispatch."""
import functools

import torch
import triton.language as tl

from ..triton.grad_scale_kernels import scale_kernel, sum_squares_kernel
from ..utils import interpreted


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
    """The host-built `tables` on `device`; to a GPU from pinned memory, without a sync."""
    pinned = device.type == "cuda"
    return {key: (value.pin_memory() if pinned else value).to(device, non_blocking=pinned)
            for key, value in tables.items()}


def _block_table(grads, owners, block):
    """The kernels' tables for `grads` (owners: each grad's group index): address [N] plus the
    cached layout tables of _layout_tables."""
    device = grads[0].device
    tables = dict(_layout_tables(device, block, tuple(grad.numel() for grad in grads), tuple(owners)))
    tables["address"] = _address_table(device, tuple(grad.data_ptr() for grad in grads))
    return tables


def scale_grads(per_group, multipliers, max_norm, eps):
    """Scale each group's grads (per_group: G lists of grad tensors) in place; norms [G] fp32."""
    triton_dtypes = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    device = next(grad for group in per_group for grad in group).device
    block = 64 if interpreted(device) else 2048     # elements a program sums (4 warps on a GPU)
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
        sum_squares_kernel[(blocks,)](*args, partial, DTYPE=triton_dtypes[dtype], BLOCK=block)
        sums.index_add_(0, tables["block_group"], partial)
        launches.append((blocks, args, tables["group"], triton_dtypes[dtype]))
    norms = sums.sqrt()
    factors = _to_device({"factors": torch.tensor([float(m) for m in multipliers],
                                                  dtype=torch.float32)}, device)["factors"]
    if max_norm is not None:
        factors = factors * (max_norm / (norms + eps)).clamp(max=1.0)
    for blocks, args, groups, dtype in launches:
        scale_kernel[(blocks,)](*args, groups, factors, DTYPE=dtype, BLOCK=block)
    return norms
