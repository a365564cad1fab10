"""Per-kernel GPU times of one MM-Adapter fwd and fwd+bwd (torch.profiler), vs wall time.

    python -m benchmarks.profile_kernels --dim 4096 --tokens 16384 --backend triton
Separates kernel time from host overhead (Python, launches) when tuning.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mlan_bench.cases_adapter import adapter_impl, make_inputs
from mlan_kernels.testing import measure


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--host", action="store_true", help="also cProfile the host side of fwd")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    x, params, grad_y = make_inputs(args.tokens, args.dim, getattr(torch, args.dtype), device)
    case = adapter_impl(args.backend, x, params, grad_y).phases
    for phase in ("fwd", "fwd+bwd"):
        wall = measure(case[phase], device)["median_ms"]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                case[phase]()
            torch.cuda.synchronize()
        print(f"== {phase}: event-timed {wall:.3f} ms per call; GPU kernels (10 calls):")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    if args.host:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            case["fwd"]()
        profiler.disable()
        torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
