"""Checking and timing kernels: the one input builder, tolerance table, comparator and timer
that the tests, the benchmark harness (`mlan_bench`), the demo
(`python/demo_mm_adapter.py`) and the trainer's throughput report share.

    inputs = make_adapter_inputs(B, L, D, r, E, g, torch.float16, "cpu", param_dtype=torch.float32)
    assert_close_to_reference(ours, oracle_in_fp64, dtype=torch.float16, name="grad_x")
    assert_within_pytorch_error(ours, pytorch_in_fp16, oracle_in_fp64, name="y")
    measure(lambda: step(), device)["median_ms"]

It imports no oracle (`mlan_kernels.reference` is test-only): callers pass the reference values.
"""
import platform
import statistics
import time
from typing import Optional

import torch

TEMPERATURE = 10.0          # the op's default router temperature
ROUTER_LOGIT_STD = 2.0      # std of router logits / TEMPERATURE: routing far from uniform

# The one tolerance table. A result passes when
#     max |ours − reference| <= TOLERANCES[dtype] · max(1, max |reference|)
# (`reference_error` computes the left side over the right's scale), with the reference in fp64
# (or in the same dtype where a test compares two implementations). The dtype is the one the
# compared result was computed in (the activations' dtype for the adapter).
# The entries are what the GPU kernels need and passed with (TF32 dot products in fp32;
# tests/test_triton_gpu.py and the cuda class of tests/test_compiled_backend.py on the H100).
# Measured on CPU (2026-12-01, max over tests/test_mm_adapter_op.py's and
# tests/test_compiled_backend.py's cases): the reference, cpu and interpreted triton backends
# stay ≤ 1.8e-6 in fp32, ≤ 6.4e-4 in fp16 and ≤ 6.0e-3 in bf16, so the CPU tests that had
# tighter tables of their own (test_compiled_backend: fp32 2e-5, fp16 2e-3, bf16 1e-2) still
# sit 5-55× inside the bound, and their 16-bit cases also check flash-attention's rule
# (`assert_within_pytorch_error`). A wrong formula errs by O(1).
TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _fp64_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float64)


def reference_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max(1, max |expected|), in fp64 (0 for empty tensors; inf
    when the two disagree on where nan/±inf are)."""
    actual, expected = _fp64_cpu(actual), _fp64_cpu(expected)
    if expected.numel() == 0:
        return 0.0
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(actual)) or not torch.equal(
            actual[~finite].nan_to_num(), expected[~finite].nan_to_num()):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(1.0, expected[finite].abs().max().item())
    return (actual[finite] - expected[finite]).abs().max().item() / scale


def assert_verbose_allclose(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5,
                            rtol: float = 1e-5, name: str = "tensor", max_print: int = 5):
    """Elementwise |actual − expected| <= atol + rtol · |expected| (Liger's comparator): shapes
    must match, nan only where the expected has nan, ±inf only where it has the same inf. On
    failure the message names `name` and lists the first `max_print` mismatching indices with
    both values."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, b = _fp64_cpu(actual), _fp64_cpu(expected)
    both_nan = a.isnan() & b.isnan()
    same_inf = a.isinf() & b.isinf() & (a == b)
    finite = torch.isfinite(a) & torch.isfinite(b)
    close = finite & ((a - b).abs() <= atol + rtol * b.abs())   # rtol · inf would admit anything
    mismatch = ~(close | both_nan | same_inf)
    if not mismatch.any():
        return
    indices = mismatch.nonzero()
    lines = [f"  at {tuple(index.tolist())}: got {a[tuple(index)].item():.6g}, "
             f"expected {b[tuple(index)].item():.6g}" for index in indices[:max_print]]
    worst = (a - b)[finite].abs().max().item() if finite.any() else float("nan")
    raise AssertionError(
        f"{name}: {len(indices)} of {b.numel()} elements differ beyond atol={atol:.3g}, "
        f"rtol={rtol:.3g} (largest finite |diff| {worst:.3g}); first mismatches:\n" + "\n".join(lines))


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor,
                              dtype: Optional[torch.dtype] = None, name: str = "tensor"):
    """The table's check: max |actual − expected| <= TOLERANCES[dtype] · max(1, max |expected|),
    through `assert_verbose_allclose` (dtype defaults to actual's)."""
    tolerance = TOLERANCES[dtype or actual.dtype]
    scale = max(1.0, _fp64_cpu(expected).nan_to_num(posinf=0, neginf=0).abs().max().item()) \
        if expected.numel() else 1.0
    assert_verbose_allclose(actual, expected, atol=tolerance * scale, rtol=0.0, name=name)


def assert_within_pytorch_error(ours: torch.Tensor, pytorch: torch.Tensor, reference: torch.Tensor,
                                factor: float = 2.0, floor: float = 0.0, name: str = "tensor"):
    """flash-attention's low-precision rule: against a reference computed in fp32/fp64, our
    error is at most `factor` × PyTorch's own error in the same low-precision dtype (+ `floor`),
    both as max |· − reference|. The bound scales with the problem, not a hand-tuned atol."""
    reference = _fp64_cpu(reference)
    if reference.numel() == 0:
        return
    ours_error = (_fp64_cpu(ours) - reference).abs().max().item()
    pytorch_error = (_fp64_cpu(pytorch) - reference).abs().max().item()
    bound = factor * pytorch_error + floor
    if not ours_error <= bound:
        raise AssertionError(f"{name}: max error {ours_error:.3g} > {factor:g} × PyTorch's "
                             f"{pytorch_error:.3g} + {floor:.3g} (against the {reference.dtype} reference)")


# ---------------------------------------------------------------- inputs
def _randn(generator, shape, std, dtype, device):
    values = torch.randn(*shape, generator=generator, dtype=torch.float64) * std
    return values.to(device=device, dtype=dtype)


def make_adapter_inputs(B, L, D, r, E, g, dtype, device, param_dtype=None, seed=0, nonzero=True,
                        single_modality=False) -> dict:
    """Keyword arguments of `mm_adapter`: random x [B, L, D] (dtype) and adapter parameters
    (param_dtype, default dtype), drawn in fp64 from `seed` then rounded.

    nonzero=False zeroes the up-projection (LaVIN's init: the adapter is the identity); the same
    seed draws the same x either way. single_modality=True gives every sample sample 0's first
    token, so all samples route alike (the op's single-modality fast path).
    """
    generator = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def randn(*shape, std=1.0, dtype=param_dtype):
        return _randn(generator, shape, std, dtype, device)

    up_weight = randn(E, D, r // g, std=(g / r) ** 0.5)
    up_bias = randn(E, D, std=0.1)
    x = randn(B, L, D, dtype=dtype)
    if single_modality:
        x[:, 0] = x[0, 0]
    return dict(
        x=x,
        down_weight=randn(r, D, std=D ** -0.5),
        down_bias=randn(r, std=0.1),
        up_weight=up_weight if nonzero else torch.zeros_like(up_weight),
        up_bias=up_bias if nonzero else torch.zeros_like(up_bias),
        router_weight=randn(E, D, std=ROUTER_LOGIT_STD * TEMPERATURE / D ** 0.5),
        router_bias=randn(E),
    )


def explicit_weights(B, E, dtype, device, seed=1) -> torch.Tensor:
    """Random routing weights [B, E] (rows sum to 1), far from uniform."""
    logits = torch.randn(B, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.softmax(2.0 * logits, dim=-1).to(device=device, dtype=dtype)


def random_grad(shape, dtype, device, seed=1) -> torch.Tensor:
    """A fixed random output gradient (same values for every caller with the same seed/dtype)."""
    return _randn(torch.Generator().manual_seed(seed), shape, 1.0, dtype, device)


# ---------------------------------------------------------------- timing
def measure(fn, device, warmup=5, iters=20) -> dict:
    """Run fn() warmup + iters times -> dict(median_ms, q1_ms, q3_ms, iqr_ms, min_ms, iters).

    CUDA: one event pair around each of back-to-back calls, one sync at the end (no L2 flush:
    the paper shapes are far larger than L2; the host may run ahead, as in a training step, so a
    call costs max(GPU time, host time)). CPU: time.perf_counter around each call.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        torch.cuda.synchronize(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(iters):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return summarize_times(times)


def summarize_times(times_ms) -> dict:
    """Median, quartiles, IQR and minimum (ms) of a list of per-call times."""
    quartiles = statistics.quantiles(times_ms, n=4) if len(times_ms) > 1 else [times_ms[0]] * 3
    return {"median_ms": statistics.median(times_ms), "q1_ms": quartiles[0], "q3_ms": quartiles[2],
            "iqr_ms": quartiles[2] - quartiles[0], "min_ms": min(times_ms), "iters": len(times_ms)}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows of it."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
