"""CPU benchmark of the compiled `cpu` backend vs the eager reference, repeated on a shared machine.

    python -m benchmarks.bench_cpu --threads 2 --dims 1024 4096 --tokens 2048 --repeats 5 \
        --out benchmarks/results/cpu-2core-$(date +%F).txt

Each repeat runs the MM-Adapter case of mlan_bench (median of --iters timed calls after
warm-up, time.perf_counter) for the backends and the eager baseline on the same tensors; the
table reports, per (impl, phase, shape), the median over repeats of those medians, their spread
(min..max), and the median over repeats of the within-repeat speed-up eager / impl, so a busy
neighbour on this shared machine during one repeat does not decide the result.
"""
import argparse
import os
import statistics
import sys

import torch

from mlan_bench.cases import PHASES, Spec, build_case
from mlan_bench.report import cpu_model, environment
from mlan_bench.runner import run_case


def bench_shape(tokens, dim, dtype, backends, iters):
    """One repeat at one shape: rows of our backends and the eager reference (no copy/memory)."""
    shape = dict(tokens=tokens, dim=dim, groups=2, routing="mixed")
    case = build_case(Spec("mm_adapter", tuple(sorted(shape.items())), PHASES), "cpu", dtype,
                      backends, baselines=["eager"])
    return run_case(case, iters=iters, warmup=5, memory=False, check=False)


def summarize(repeats):
    """repeats: list of row lists -> one row per (impl, phase, N, D) with the median, min and max
    over repeats of the repeat's median time, and the median over repeats of the speed-up
    eager / impl measured within the same repeat (same shape, seconds apart, so a busy
    neighbour tends to slow both)."""
    table = {}
    for rows in repeats:
        for row in rows:
            key = (row["impl"], row["phase"], row["tokens"], row["dim"])
            entry = table.setdefault(key, {"times": [], "speedups": []})
            entry["times"].append(row["median_ms"])
            entry["speedups"].append(row.get("speedup_vs_eager", float("nan")))
    return [dict(impl=impl, phase=phase, tokens=tokens, dim=dim, ms=statistics.median(entry["times"]),
                 low=min(entry["times"]), high=max(entry["times"]),
                 speedup=statistics.median(entry["speedups"]))
            for (impl, phase, tokens, dim), entry in table.items()]


def format_table(summary):
    lines = [f"{'impl':<8}{'phase':<9}{'N':>6}{'D':>6}{'median ms':>11}{'min..max ms':>20}"
             f"{'x eager (median of repeats)':>29}"]
    for r in summary:
        spread = f"{r['low']:.2f}..{r['high']:.2f}"
        lines.append(f"{r['impl']:<8}{r['phase']:<9}{r['tokens']:>6}{r['dim']:>6}{r['ms']:>11.2f}"
                     f"{spread:>20}{r['speedup']:>29.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048])
    parser.add_argument("--backends", nargs="+", default=["cpu"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", help="also write command, environment and table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device("cpu"), getattr(torch, args.dtype)
    repeats = []
    for _ in range(args.repeats):
        rows = []
        for dim in args.dims:
            for tokens in args.tokens:
                rows += bench_shape(tokens, dim, dtype, args.backends, args.iters)
        repeats.append(rows)
    info = environment(device, dtype)
    header = [f"command: python -m benchmarks.bench_cpu {' '.join(argv if argv is not None else sys.argv[1:])}",
              f"date: {info['date']}  torch: {info['torch']}  python: {info['python']}",
              f"cpu: {cpu_model()}  (os.cpu_count() = {os.cpu_count()})",
              f"torch.get_num_threads() = {torch.get_num_threads()}  dtype: {args.dtype}  "
              f"r=8 E=2 g=2, mixed routing (single_modality=False), fp32 params",
              f"load average at the end: {os.getloadavg()}",
              f"{args.repeats} repeats x (5 warm-up + {args.iters} timed calls); "
              f"'median ms' = median over repeats of each repeat's median"]
    text = "\n".join(header) + "\n\n" + format_table(summarize(repeats)) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
