"""Sweep the Triton backend's tile sizes (BLOCK_N, BLOCK_D, num_warps) per kernel on a GPU.

    python -m benchmarks.tune_triton --kernel rows --dim 4096 --tokens 16384
Holds the other kernels at backends/triton.GPU_TILES and prints, per config, the GPU time of the
kernel being tuned (torch.profiler, immune to host overhead) with % of copy bandwidth for its
minimum traffic; the winners go into GPU_TILES.
"""
import argparse
import itertools

import torch

import mlan_kernels.backends.triton as triton_backend
from mlan_bench.cases import copy_impl
from mlan_bench.cases_adapter import adapter_impl, make_inputs
from mlan_kernels.testing import measure

KERNEL_NAMES = {"fwd": "mm_adapter_fwd_kernel", "rows": "mm_adapter_bwd_rows_kernel",
                "cols": "mm_adapter_bwd_cols_kernel"}
TRAFFIC = {"fwd": 2, "rows": 1, "cols": 3}     # minimum N·D elements moved by each kernel


def kernel_ms(fn, name, calls=10):
    """Mean GPU time (ms) of the kernel called `name` per fn() call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = sum(event.device_time_total for event in prof.key_averages() if event.key == name)
    return total_us / calls / 1e3


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", nargs="+", default=["fwd", "rows", "cols"])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--block-d", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    x, params, grad_y = make_inputs(args.tokens, args.dim, getattr(torch, args.dtype), device)
    copy_ms = measure(copy_impl(x).phases["copy"], device)["median_ms"]
    print(f"copy {copy_ms:.3f} ms ({2 * x.numel() * x.element_size() / copy_ms / 1e6:.0f} GB/s); "
          f"defaults {triton_backend.GPU_TILES}")
    defaults = dict(triton_backend.GPU_TILES)
    for kernel in args.kernel:
        for config in itertools.product(args.block_n, args.block_d, args.warps):
            triton_backend.GPU_TILES = {**defaults, kernel: config}
            case = adapter_impl("triton", x, params, grad_y).phases
            try:
                ms = kernel_ms(case["fwd+bwd"], KERNEL_NAMES[kernel])
            except Exception as error:  # e.g. out of shared memory for a config
                print(f"{kernel} {config}: failed ({type(error).__name__})")
                continue
            print(f"{kernel:<5}{str(config):<16} {ms * 1e3:7.1f} us  "
                  f"({100 * TRAFFIC[kernel] / 2 * copy_ms / ms:3.0f}% copy)")
    triton_backend.GPU_TILES = defaults


if __name__ == "__main__":
    main()
