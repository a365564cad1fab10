"""Measure one case: every implementation and phase on the case's tensors -> result rows.

Row keys: op, phase, impl, role, dtype, shape (label), size, series, the case's shape fields,
median_ms, q1_ms, q3_ms, iqr_ms, min_ms, iters, min_bytes, gb_per_s (min_bytes / median),
copy_gb_per_s (y.copy_(x) in the same case), pct_copy, speedup_vs_eager (reference median /
this median, same phase), peak_memory_bytes (timing.peak_memory of one more call),
saved_bytes (activations kept for backward, grad-mode implementations), max_rel_err and ok
(the output check against the reference, implementations that compute the same math, with
`mlan_kernels.testing`'s tolerance table).
An implementation that raises gets one row with `error` and a warning; the run goes on.
"""
import warnings

import torch

from mlan_kernels.testing import measure, reference_error
from . import timing
from .traffic import copy_bytes


def relative_error(outputs, expected) -> float:
    """The worst `reference_error` (max |a − b| / max(1, max |b|)) over paired tensors."""
    return max((reference_error(actual, wanted) for actual, wanted in zip(outputs, expected)),
               default=0.0)


def check_impl(case, impl, expected):
    """(max relative error, ok) of impl's outputs vs the reference's, or (None, None) when the
    implementation computes other math (LoRA, unfused in the logits' dtype) or has no reference."""
    if impl.outputs is None or expected is None or impl.role == "reference":
        return None, None
    error = relative_error(impl.outputs(), expected)
    return error, bool(error <= case.tolerance)


def _base_row(case, impl, phase):
    return dict(op=case.op, phase=phase, impl=impl.name, role=impl.role,
                dtype=str(case.dtype).replace("torch.", ""), shape=case.label, size=case.size,
                series=case.series, **case.fields)


def run_case(case, iters=20, warmup=5, phases=None, memory=True, check=True) -> list:
    """Rows for every implementation of `case` (phases: which to run; None = all it has)."""
    device = case.device
    if any(impl.name == "compile" for impl in case.impls):
        torch._dynamo.reset()                          # compile specialized to this case
    reference = next((impl for impl in case.impls if impl.role == "reference"), None)
    expected = reference.outputs() if check and reference is not None and reference.outputs else None
    rows, copy_rate = [], None
    for impl in sorted(case.impls, key=lambda impl: impl.role != "ceiling"):   # copy first
        try:
            rows += _run_impl(case, impl, iters, warmup, phases, memory, expected)
        except Exception as error:                     # e.g. a compile failure: keep the run going
            warnings.warn(f"{case.op} {case.label} {impl.name}: {type(error).__name__}: {error}")
            rows.append(dict(_base_row(case, impl, "error"), error=f"{type(error).__name__}: {error}"))
        if impl.role == "ceiling" and rows and "median_ms" in rows[-1]:
            copy_rate = rows[-1]["gb_per_s"]
    for row in rows:
        row["copy_gb_per_s"] = copy_rate
        if copy_rate and row.get("gb_per_s"):
            row["pct_copy"] = 100.0 * row["gb_per_s"] / copy_rate
    _add_speedups(rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return rows


def _run_impl(case, impl, iters, warmup, phases, memory, expected):
    error, ok = check_impl(case, impl, expected)
    saved = None
    if impl.grad_forward is not None and any(p in impl.phases for p in ("bwd", "fwd+bwd")):
        saved = timing.saved_tensor_bytes(impl.grad_forward, impl.exclude)
    rows = []
    for phase, fn in impl.phases.items():
        if phases is not None and phase not in phases and impl.role != "ceiling":
            continue
        row = _base_row(case, impl, phase)
        row.update(measure(fn, case.device, warmup=warmup, iters=iters))
        row["min_bytes"] = (copy_bytes(case.copy_numel, case.element) if impl.role == "ceiling"
                            else case.min_bytes(phase))
        row["gb_per_s"] = row["min_bytes"] / row["median_ms"] / 1e6
        row["peak_memory_bytes"] = timing.peak_memory(fn, case.device) if memory else None
        row["saved_bytes"] = saved if phase != "fwd" else None
        row["max_rel_err"], row["ok"] = error, ok
        rows.append(row)
    return rows


def _add_speedups(rows):
    eager = {row["phase"]: row["median_ms"] for row in rows
             if row["role"] == "reference" and "median_ms" in row}
    for row in rows:
        if row["phase"] in eager and "median_ms" in row:
            row["speedup_vs_eager"] = eager[row["phase"]] / row["median_ms"]
