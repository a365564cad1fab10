"""MM-Adapter benchmark: our backends vs baselines on the same tensors, with % of copy bandwidth.

    python -m benchmarks.bench_mm_adapter --device cuda --dtype bfloat16 --dims 4096 --tokens 16384
Prints a table; --json PATH writes the rows with device/torch/triton versions.
Minimum traffic (elements of x's dtype): fwd 2·N·D, bwd 3·N·D, fwd+bwd 5·N·D.
"""
import argparse
import datetime
import json
import platform

import torch

from benchmarks.mm_adapter_cases import adapter_case, copy_case, lora_case, make_inputs, reference_case
from benchmarks.timing import measure

TRAFFIC = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}


def environment(device):
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = platform.processor() or platform.machine()
    return info


def bench_shape(tokens, dim, dtype, device, backends, baselines, iters, groups=2, single_modality=False):
    x, params, grad_y = make_inputs(tokens, dim, dtype, device, groups=groups, single_modality=single_modality)
    element = x.element_size()
    copy_ms = measure(copy_case(x)["copy"], device, iters=iters)["median_ms"]
    copy_gbs = 2 * x.numel() * element / copy_ms / 1e6
    cases = {name: adapter_case(name, x, params, grad_y, groups=groups, single_modality=single_modality)
             for name in backends}
    if "eager" in baselines:
        cases["eager"] = reference_case(x, params, grad_y, groups=groups)
    if "compile" in baselines:
        cases["compile"] = reference_case(x, params, grad_y, groups=groups, compiled=True)
    if "lora" in baselines:
        cases["lora"] = lora_case(x, params, grad_y)
    rows = []
    for name, case in cases.items():
        for phase, fn in case.items():
            timing = measure(fn, device, iters=iters)
            gbs = TRAFFIC[phase] * x.numel() * element / timing["median_ms"] / 1e6
            rows.append(dict(impl=name, phase=phase, tokens=tokens, dim=dim, dtype=str(dtype).replace("torch.", ""),
                             groups=groups, single_modality=single_modality, **timing,
                             gb_per_s=gbs, pct_copy=100 * gbs / copy_gbs, copy_gb_per_s=copy_gbs))
    eager = {r["phase"]: r["median_ms"] for r in rows if r["impl"] == "eager"}
    for row in rows:
        if row["phase"] in eager:
            row["speedup_vs_eager"] = eager[row["phase"]] / row["median_ms"]
    return rows


def print_table(rows):
    header = f"{'impl':<10}{'phase':<9}{'N':>7}{'D':>6}{'ms':>9}{'GB/s':>8}{'%copy':>7}{'x eager':>8}"
    print(header)
    for r in rows:
        print(f"{r['impl']:<10}{r['phase']:<9}{r['tokens']:>7}{r['dim']:>6}{r['median_ms']:>9.3f}"
              f"{r['gb_per_s']:>8.0f}{r['pct_copy']:>7.1f}{r.get('speedup_vs_eager', float('nan')):>8.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--dims", type=int, nargs="+", default=[4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--backends", nargs="+", default=["triton"])
    parser.add_argument("--baselines", nargs="+", default=["eager", "compile", "lora"])
    parser.add_argument("--single-modality", action="store_true")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for dim in args.dims:
        for tokens in args.tokens:
            rows += bench_shape(tokens, dim, dtype, device, args.backends, args.baselines, args.iters,
                                single_modality=args.single_modality)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": environment(device), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
