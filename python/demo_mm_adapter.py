"""Demo: one LLaMA-7B-shaped MM-Adapter, forward + backward on every backend, checked and timed.

The adapter is LaVIN's (D=4096, r=8, E=2 experts, g=2 groups, temperature 10, scale 1,
dropout 0.1 in train mode) with random, non-zero up-projections (as after some training; at
LaVIN's zero init every gradient but the up-projection's would be zero and the check vacuous).
Two batches: "mixed" routes each sample by its own random first token, "single" gives every
sample the same modality token, so all routing weights are equal (the single-U fast path).

For each device it runs the default backend (backend="auto", i.e. what
`mlan_kernels.dispatch.select_backend` picks) and backend="reference", compares y and every
gradient with the reference backend, checks the reference backend itself against autograd
through the oracle (`mlan_kernels.reference.mm_adapter_reference`), and times both.
`--triton-interpret` also runs the triton backend under the Triton interpreter on a small
shape (slow; meant for CPU-only machines). Exits 1 if any check fails.

    python python/demo_mm_adapter.py [--device auto|cpu|cuda] [--dim 4096] [--tokens 128]
"""
import argparse
import os
import sys

import torch

from mlan_kernels.help_format import DefaultsHelpFormatter
from mlan_kernels.testing import TOLERANCES, make_adapter_inputs, measure, random_grad, reference_error

RANK, EXPERTS, GROUPS, TEMPERATURE, SCALE, DROPOUT_P, DROPOUT_SEED = 8, 2, 2, 10.0, 1.0, 0.1, 1234
PARAMETERS = ("down_weight", "down_bias", "up_weight", "up_bias", "router_weight", "router_bias")
# Column label of each compared tensor, in the design doc's symbols.
OUTPUT_LABELS = {"y": "y", "x": "dX", "down_weight": "dW_A", "down_bias": "db_A",
                 "up_weight": "dW_U", "up_bias": "db_U", "router_weight": "dW_R", "router_bias": "db_R"}
SMALL_SHAPE = {"batch": 2, "tokens": 16, "dim": 256}   # for the interpreted triton run
INTERPRETED_ITERS = 3                                   # the interpreter is ~1000x slower


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cpu, and cuda too when available")
    parser.add_argument("--dim", type=int, default=4096, help="hidden size D")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sample L")
    parser.add_argument("--batch", type=int, default=4, help="samples per batch B")
    parser.add_argument("--iters", type=int, default=10,
                        help="timed iterations per measurement")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="activation dtype; parameters stay fp32 (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--triton-interpret", action="store_true",
                        help="also run the triton backend under TRITON_INTERPRET=1 on a small shape")
    return parser.parse_args(argv)


def make_problem(name, batch, tokens, dim, device, dtype, single_modality, seed):
    """Parameters (fp32), input x [B, L, D] and upstream gradient grad_y [B, L, D] (dtype), from
    the tests' builder (`mlan_kernels.testing.make_adapter_inputs`)."""
    params = make_adapter_inputs(batch, tokens, dim, RANK, EXPERTS, GROUPS, dtype, device,
                                 param_dtype=torch.float32, seed=seed,
                                 single_modality=single_modality)
    x = params.pop("x")
    return {"name": name, "x": x, "grad_y": random_grad(x.shape, dtype, device, seed=seed + 1),
            "params": params}


def _leaves(problem):
    x = problem["x"].clone().requires_grad_()
    params = {key: value.clone().requires_grad_() for key, value in problem["params"].items()}
    return x, params


def _gradients(y, x, params):
    outputs = {"y": y.detach(), "x": x.grad}
    outputs.update({key: params[key].grad for key in PARAMETERS})
    return outputs


def run_op(problem, backend, x=None, params=None):
    """y = mm_adapter(x, ...) with the demo's hyper-parameters on `backend`."""
    from mlan_kernels.ops.mm_adapter import mm_adapter
    x = problem["x"] if x is None else x
    params = problem["params"] if params is None else params
    return mm_adapter(x, *(params[key] for key in PARAMETERS), scale=SCALE,
                      temperature=TEMPERATURE, dropout_p=DROPOUT_P, seed=DROPOUT_SEED,
                      groups=GROUPS, backend=backend)


def forward_backward(problem, backend):
    """{"y", "x", <parameter>: tensor} — output and gradients of <grad_y, y> on `backend`."""
    x, params = _leaves(problem)
    y = run_op(problem, backend, x, params)
    y.backward(problem["grad_y"])
    return _gradients(y, x, params)


def oracle_forward_backward(problem):
    """The same through autograd of the plain-torch oracle (router included)."""
    from mlan_kernels.reference import mm_adapter_reference
    x, params = _leaves(problem)
    y, _, _ = mm_adapter_reference(x, *(params[key] for key in PARAMETERS), scale=SCALE,
                                   temperature=TEMPERATURE, dropout_p=DROPOUT_P,
                                   seed=DROPOUT_SEED, groups=GROUPS)
    y.backward(problem["grad_y"])
    return _gradients(y, x, params)


def compare(result, expected, dtype):
    """(max |diff| per output, worst reference_error / tolerance) with the activation dtype's
    entry of the tolerance table."""
    diffs, worst = {}, 0.0
    for key, want in expected.items():
        diffs[key] = (result[key].double() - want.double()).abs().max().item()
        worst = max(worst, reference_error(result[key], want) / TOLERANCES[dtype])
    return diffs, worst


def median_ms(function, iters, device):
    """Median time of `function()` in ms over `iters` runs after one warm-up."""
    return measure(function, device, warmup=1, iters=iters)["median_ms"]


def time_backend(problem, backend, iters, device):
    """(forward ms, forward+backward ms): training-mode forward, then backward of <grad_y, y>."""
    x, params = _leaves(problem)
    forward_ms = median_ms(lambda: run_op(problem, backend, x, params), iters, device)
    fwd_bwd_ms = median_ms(lambda: run_op(problem, backend, x, params).backward(problem["grad_y"]),
                           iters, device)
    return forward_ms, fwd_bwd_ms


def print_table(title, headers, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    print(f"\n{title}")
    for row in (headers, ["-" * width for width in widths], *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def run_device(device, dtype, args, check_rows, timing_rows):
    """Run every problem and backend on one device; append table rows; return all-passed."""
    from mlan_kernels import dispatch
    chosen = dispatch.select_backend(device, dtype)
    print(f"{device.type} {str(dtype).replace('torch.', '')}: default backend "
          f"(select_backend) -> {chosen}")
    shape = {"batch": args.batch, "tokens": args.tokens, "dim": args.dim}
    plans = [(routing, shape, ("auto", "reference"), args.iters) for routing in ("mixed", "single")]
    if args.triton_interpret:
        reason = dispatch.unavailable_reason("triton", device, dtype)
        if reason is None:
            plans += [(f"{routing}-small", SMALL_SHAPE, ("triton", "reference"),
                       min(args.iters, INTERPRETED_ITERS)) for routing in ("mixed", "single")]
        else:
            print(f"  triton backend skipped: {reason}")
    all_passed = True
    for seed, (name, sizes, backends, iters) in enumerate(plans):
        problem = make_problem(name, device=device, dtype=dtype,
                               single_modality=name.startswith("single"), seed=2 * seed, **sizes)
        tokens = sizes["batch"] * sizes["tokens"]
        expected = forward_backward(problem, "reference")
        checks = [(backend, "reference", forward_backward(problem, backend), expected)
                  for backend in backends if backend != "reference"]
        checks.append(("reference", "oracle autograd", expected, oracle_forward_backward(problem)))
        for backend, against, result, want in checks:
            diffs, worst = compare(result, want, dtype)
            passed = worst <= 1.0
            all_passed &= passed
            label = f"auto ({chosen})" if backend == "auto" else backend
            check_rows.append([device.type, name, label, against,
                               *(f"{diffs[key]:.1e}" for key in OUTPUT_LABELS),
                               f"{worst:.2f}", "PASS" if passed else "FAIL"])
        for backend in backends:
            forward_ms, fwd_bwd_ms = time_backend(problem, backend, iters, device)
            label = f"auto ({chosen})" if backend == "auto" else backend
            timing_rows.append([device.type, str(dtype).replace("torch.", ""), name, label,
                                f"{sizes['batch']}x{sizes['tokens']}x{sizes['dim']}",
                                f"{forward_ms:.2f}", f"{fwd_bwd_ms:.2f}",
                                f"{tokens / fwd_bwd_ms * 1e3:,.0f}", str(iters)])
    return all_passed


def main(argv=None):
    args = parse_args(argv)
    if args.triton_interpret:
        os.environ["TRITON_INTERPRET"] = "1"      # before anything imports triton
    import mlan_kernels

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    devices = {"cpu": ["cpu"], "cuda": ["cuda"],
               "auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}[args.device]
    print(f"MM-Adapter demo: D={args.dim} r={RANK} E={EXPERTS} g={GROUPS} t={TEMPERATURE:g} "
          f"scale={SCALE:g} dropout={DROPOUT_P} (train mode, seed {DROPOUT_SEED}), "
          f"B={args.batch} L={args.tokens}; mlan_kernels {mlan_kernels.__version__}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    check_rows, timing_rows, all_passed = [], [], True
    for device_name in devices:
        device = torch.device(device_name)
        default_dtype = "float32" if device.type == "cpu" else "bfloat16"
        dtype = getattr(torch, args.dtype or default_dtype)
        all_passed &= run_device(device, dtype, args, check_rows, timing_rows)

    print_table("Correctness: max |diff| of y and of each gradient (fp32 params; "
                "PASS when every diff <= tol * max(1, max|expected|))",
                ["device", "batch", "backend", "vs", *OUTPUT_LABELS.values(), "diff/tol", "result"],
                check_rows)
    tolerances = "; ".join(f"{str(dtype).replace('torch.', '')} tol={tolerance:g}"
                           for dtype, tolerance in TOLERANCES.items())
    print(f"tolerances: {tolerances}; diff/tol = worst ratio over the row (<= 1 passes)")
    print_table("Timing: median ms (fwd = training-mode forward; tokens/s from fwd+bwd)",
                ["device", "dtype", "batch", "backend", "BxLxD", "fwd ms", "fwd+bwd ms",
                 "tokens/s", "iters"], timing_rows)
    print(f"\n{'PASS' if all_passed else 'FAIL'}: "
          f"{sum(row[-1] == 'PASS' for row in check_rows)}/{len(check_rows)} checks passed")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
