"""Triton multi-tensor kernels for per-group gradient norm + scale (ops/grad_scale.py).

Many small tensors (LaVIN-7B: 56 adapters × 6 parameters) are processed by ONE launch per
phase instead of one per tensor: the host packs, for the tensors of one dtype,
    addresses [N] int64 (data_ptr), numels [N], groups [N]  (tensor -> group)
and splits every tensor into BLOCK-element blocks:
    block_tensor [NB], block_start [NB]                      (block -> tensor, first element)
Program b then reads its block through a pointer rebuilt from the packed address.
    sum_squares_kernel: partial[b] = Σ x² over block b (fp32)   -> per-group sums on the host
    scale_kernel:       x *= factor[groups[tensor(b)]] over block b, in place
Tensors must be contiguous (parameter gradients are).
"""
import triton
import triton.language as tl


@triton.jit
def block_pointers(address_ptr, numel_ptr, block_tensor_ptr, block_start_ptr,
                   DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """(pointers [BLOCK], in-range mask [BLOCK], tensor index) of this program's block."""
    block = tl.program_id(0)
    tensor = tl.load(block_tensor_ptr + block)
    offsets = tl.load(block_start_ptr + block) + tl.arange(0, BLOCK)
    base = tl.load(address_ptr + tensor).to(tl.pointer_type(DTYPE))
    return base + offsets, offsets < tl.load(numel_ptr + tensor), tensor


@triton.jit
def sum_squares_kernel(address_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, partial_ptr,
                       DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """partial[b] = Σ x² (fp32) over block b."""
    pointers, ok, _ = block_pointers(address_ptr, numel_ptr, block_tensor_ptr, block_start_ptr,
                                     DTYPE, BLOCK)
    values = tl.load(pointers, mask=ok, other=0.0).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(values * values, axis=0))


@triton.jit
def scale_kernel(address_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, group_ptr, factor_ptr,
                 DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """x *= factor[group of the block's tensor] (fp32 multiply, stored in the tensor's dtype)."""
    pointers, ok, tensor = block_pointers(address_ptr, numel_ptr, block_tensor_ptr,
                                          block_start_ptr, DTYPE, BLOCK)
    factor = tl.load(factor_ptr + tl.load(group_ptr + tensor))
    values = tl.load(pointers, mask=ok, other=0.0).to(tl.float32)
    tl.store(pointers, (values * factor).to(DTYPE), mask=ok)
