"""Sweep the Triton backend's tile sizes (BLOCK_N, BLOCK_D, num_warps) on a GPU.

    python -m benchmarks.tune_triton --dim 4096 --tokens 16384 --dtype bfloat16
Prints fwd / bwd times and % of copy bandwidth per config (used to pick backends/triton._tiles).
"""
import argparse
import itertools

import torch

import mlan_kernels.backends.triton as triton_backend
from benchmarks.mm_adapter_cases import adapter_case, copy_case, make_inputs
from benchmarks.timing import measure


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-n", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--block-d", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    x, params, grad_y = make_inputs(args.tokens, args.dim, getattr(torch, args.dtype), device)
    copy_ms = measure(copy_case(x)["copy"], device)["median_ms"]
    print(f"copy {copy_ms:.3f} ms  ({2 * x.numel() * x.element_size() / copy_ms / 1e6:.0f} GB/s)")
    original = triton_backend._tiles
    for block_n, block_d, warps in itertools.product(args.block_n, args.block_d, args.warps):
        triton_backend._tiles = lambda dim, device, c=(block_n, block_d, warps): c
        case = adapter_case("triton", x, params, grad_y)
        try:
            fwd = measure(case["fwd"], device)["median_ms"]
            both = measure(case["fwd+bwd"], device)["median_ms"]
        except Exception as error:  # e.g. out of shared memory for a config
            print(f"BLOCK_N={block_n:<3} BLOCK_D={block_d:<4} warps={warps}: failed ({type(error).__name__})")
            continue
        print(f"BLOCK_N={block_n:<3} BLOCK_D={block_d:<4} warps={warps}: fwd {fwd:.3f} ms "
              f"({100 * 2 * copy_ms / 2 / fwd:.0f}% copy)  fwd+bwd {both:.3f} ms ({100 * 2.5 * copy_ms / both:.0f}% copy)")
    triton_backend._tiles = original


if __name__ == "__main__":
    main()
