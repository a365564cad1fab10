"""mlan-bench: our kernels vs the baselines, same tensors, same run -> table, JSON, CSV, PNG.

    mlan-bench --device cuda --shapes paper          (= python -m benchmarks.run ...)
    mlan-bench --device cpu --ops mm_adapter_fwdbwd,kl_div --iters 20 --json out.json

Each op row: median and IQR of --iters timed calls after --warmup, GB/s from the op's minimum
traffic (mlan_bench/traffic.py), % of the y.copy_(x) bandwidth measured on the same case, speed-up
over the eager reference, peak extra memory, bytes saved for backward, and a check of the
output against the reference. A row measured with fewer than 10 calls, or whose IQR exceeds 25 %
of its median, gets a WARNING in the table (and in the JSON/CSV `warning` field) and one stderr
line per case: compare such timings only after a rerun with more --iters on a quiet machine.
Writes <out-dir>/<machine>-<dtype>-<date>.json (+ .csv and PNGs
next to it) unless --json/--csv/--plot say otherwise; <machine> is cpu-<threads>core on CPU
and the GPU's name on CUDA (e.g. cpu-2core-fp32-2026-11-23.json, h100-bf16-2026-11-23.json).
"""
import argparse
import os
import sys
import tempfile

import torch

from . import report
from mlan_kernels.help_format import DefaultsHelpFormatter
from .cases import BASELINES, OPS, build_case, case_baselines, grid
from .runner import run_case

E2E_OP = "e2e_step"
OUR_BACKENDS = ("reference", "triton", "cuda", "cpu", "chunked", "foreach")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _names(text):
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


class UsageError(ValueError):
    """A command-line error: main() prints it as one line `mlan-bench: error: ...`, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    result = _Parser(prog="mlan-bench", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    result.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when available, else cpu")
    result.add_argument("--dtype", choices=sorted(DTYPES),
                        help="activation dtype (default: bfloat16 on cuda, float32 on cpu)")
    result.add_argument("--shapes", default="paper", choices=["small", "paper", "all"],
                        help="shape preset of mlan_bench/cases.py (CPU 'paper' = D∈{1024,4096} x "
                             "N∈{512,2048} and D∈{128,512} at N=2048, GPU: docs/performance.md grid)")
    result.add_argument("--ops", help=f"comma list of {','.join(list(OPS) + [E2E_OP])} (default: all "
                                      f"of them; {E2E_OP} uses --e2e-preset)")
    result.add_argument("--backends", help="comma list of our backends to run (default: every one "
                                           "available: triton,cuda | cpu | chunked | foreach)")
    result.add_argument("--baselines", default=",".join(BASELINES),
                        help="comma list of baselines to run")
    result.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile(reference) baseline; compiling takes ~7 s per graph and "
                             "shape on 2 cores, longer than the CPU grid's measurements "
                             "(default: on for cuda; on cpu for the MM-Adapter ops only)")
    result.add_argument("--iters", type=int, default=20, help="timed calls per row")
    result.add_argument("--warmup", type=int, help="untimed calls first (default: 5 on cuda, 3 on cpu)")
    result.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs (default: torch's default)")
    result.add_argument("--json", help="results JSON path (default: <out-dir>/<machine>-<dtype>-<date>.json)")
    result.add_argument("--csv", help="results CSV path (default: the JSON path with .csv)")
    result.add_argument("--plot", help="directory of the PNG plots (default: next to the JSON)")
    result.add_argument("--no-plot", action="store_true", help="write no PNG")
    result.add_argument("--out-dir", default=os.path.join("benchmarks", "results"),
                        help="directory of the default JSON/CSV/PNG paths")
    result.add_argument("--no-memory", action="store_true", help="skip the peak-memory call per row")
    result.add_argument("--no-check", action="store_true", help="skip the output checks")
    result.add_argument("--e2e-preset", choices=["tiny", "small", "paper"],
                        help=f"preset of {E2E_OP} (default: paper on cuda, small on cpu)")
    return result


def _subset(option, names, known):
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"--{option}: unknown {unknown}; expected a comma list of {list(known)}")


def _can_create_in(directory) -> bool:
    """Whether a file can be created under `directory` (or, while it does not exist yet, in
    its nearest existing ancestor): tried, so read-only file systems count as well."""
    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    if not os.path.isdir(directory):
        return False
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _writable_parent(option, path):
    """UsageError unless a file can be created at `path` (checked before any measurement)."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"--{option} {path}: is a directory, expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not _can_create_in(parent):
        raise UsageError(f"--{option} {path}: cannot be created (no writable directory at {parent})")


def _writable_directory(option, path):
    """UsageError unless `path` is, or can be created as, a directory files can be written in."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--{option} {path}: exists and is not a directory")
    if not _can_create_in(os.path.abspath(path)):
        raise UsageError(f"--{option} {path}: not a writable directory (checked before the run)")


def resolve(args):
    """(device, dtype, kernel ops, run e2e?, baselines, warmup) from the parsed arguments."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch.cuda.is_available() is False (accepted here: auto, cpu)")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    for option in ("ops", "backends"):
        if getattr(args, option) is not None and not _names(getattr(args, option)):
            raise UsageError(f"--{option}: empty; expected a comma list (leave it out for all)")
    ops = _names(args.ops) or list(OPS) + [E2E_OP]
    _subset("ops", ops, list(OPS) + [E2E_OP])
    _subset("backends", _names(args.backends) or [], OUR_BACKENDS)
    baselines = _names(args.baselines) or []
    _subset("baselines", baselines, BASELINES)
    baselines = [name for name in baselines if name != "compile" or args.compile is not False]
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 3)
    if args.iters < 1:
        raise UsageError(f"--iters must be >= 1, got {args.iters}")
    if warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {warmup}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.json is None or (args.plot is None and not args.no_plot):
        _writable_directory("out-dir", args.out_dir)
    for option in ("json", "csv"):
        _writable_parent(option, getattr(args, option))
    if args.plot is not None and not args.no_plot:
        _writable_directory("plot", args.plot)
    return device, dtype, [op for op in ops if op != E2E_OP], E2E_OP in ops, baselines, warmup


def run_e2e(device, dtype, preset, iters, warmup) -> list:
    """Rows of the end-to-end step benchmark (mlan_bench/e2e_step.py), [] with a message if absent."""
    try:
        from .e2e_step import run_e2e_step
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}.e2e_step":
            raise
        print(f"mlan-bench: {E2E_OP} skipped: mlan_bench/e2e_step.py is not installed "
              f"in this checkout", file=sys.stderr)
        return []
    rows = report.e2e_rows(run_e2e_step(device.type, dtype, preset=preset, iters=iters, warmup=warmup))
    for row in rows:
        row.setdefault("dtype", str(dtype).replace("torch.", ""))
        row.setdefault("iters", iters)
    return rows


def run_grid(specs, device, dtype, args, baselines, warmup) -> list:
    from tqdm import tqdm
    rows = []
    for spec in tqdm(specs, desc="mlan-bench", unit="case", file=sys.stderr):
        case = build_case(spec, device, dtype, _names(args.backends),
                          case_baselines(baselines, device.type, spec.op, args.compile))
        rows += run_case(case, iters=args.iters, warmup=warmup, phases=spec.phases,
                         memory=not args.no_memory, check=not args.no_check)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def write_outputs(args, env, rows, command) -> list:
    """JSON, CSV and PNGs; returns the paths written."""
    json_path = args.json or report.default_path(args.out_dir, env)
    stem = os.path.splitext(json_path)[0]
    csv_path = args.csv or stem + ".csv"
    report.write_json(json_path, env, rows, command)
    report.write_csv(csv_path, rows)
    paths = [json_path, csv_path]
    if not args.no_plot:
        from .plots import plot_all
        paths += plot_all(rows, args.plot or os.path.dirname(os.path.abspath(json_path)),
                          os.path.basename(stem))
    return paths


def main(argv=None) -> int:
    """Exit status 0; 1 when a row fails its check; 2 for a usage error, printed as one line."""
    try:
        args = parser().parse_args(argv)
        device, dtype, ops, e2e, baselines, warmup = resolve(args)
    except UsageError as error:
        print(f"mlan-bench: error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    env = report.environment(device, dtype)
    print(f"mlan-bench: {env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"{env['threads']} threads, {env['dtype']}, shapes {args.shapes}", file=sys.stderr)
    rows = run_grid(grid(ops, device.type, args.shapes), device, dtype, args, baselines, warmup) if ops else []
    if e2e:
        preset = args.e2e_preset or ("paper" if device.type == "cuda" else "small")
        rows += run_e2e(device, dtype, preset, args.iters, warmup)
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    for row in rows:
        row["warning"] = None if "error" in row else (report.trust_warning(row) or None)
    print(report.format_table(rows))
    for line in report.case_warnings(rows):                 # one line per case, after the table
        print(f"mlan-bench: {line}", file=sys.stderr)
    command = "mlan-bench " + " ".join(sys.argv[1:] if argv is None else argv)
    for path in write_outputs(args, env, rows, command):
        print(f"wrote {path}")
    failed = [row for row in rows if row.get("ok") is False or "error" in row]
    for row in failed:
        print(f"mlan-bench: {row['op']} {row['phase']} {row['shape']} {row['impl']}: "
              f"{row.get('error') or 'output differs from the reference (max rel err %.2e)' % row['max_rel_err']}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
