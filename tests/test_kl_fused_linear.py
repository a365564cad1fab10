"""fused_linear_kl: equals the unfused KL of hidden·Wᵀ logits (values and gradients), never
allocates a [T, V] tensor and peaks at a fraction of the unfused memory (TensorMemory on CPU,
the CUDA allocator on GPU), opcheck of its registered ops."""
import importlib
import re

import pytest
import torch

from mlan_kernels.ops.fused_linear_kl import (fused_linear_kl, fused_linear_kl_backward_op,
                                              fused_linear_kl_op)
from mlan_bench.tensor_memory import TensorMemory
from mlan_kernels.ops.kl_div import kl_div_logits, kl_rows_backward, kl_rows_forward
from mlan_kernels.reference import kl_div_logits_reference

from helpers import HAS_KL_CPU, HAS_TRITON, assert_verbose_allclose

# the package re-exports the function under the module's name, so fetch the module itself
fused_linear_kl_module = importlib.import_module("mlan_kernels.ops.fused_linear_kl")

pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")


def make_inputs(tokens=24, hidden=16, vocab=300, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden_p = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    hidden_q = hidden_p + 0.3 * torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) / hidden ** 0.5
    return [t.to(dtype).requires_grad_() for t in (hidden_p, hidden_q, weight)]


def unfused(hidden_p, hidden_q, weight, mask=None, reduction="batchmean"):
    return kl_div_logits_reference(hidden_p @ weight.t(), hidden_q @ weight.t(), mask, reduction)


@pytest.mark.parametrize("backend", ["chunked", pytest.param(
    "triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")), pytest.param(
    "cpu", marks=pytest.mark.skipif(not HAS_KL_CPU, reason="mlan_kernels._C is not built"))])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_equals_unfused_values_and_gradients(backend, reduction):
    tokens = 24 if backend == "chunked" else 6
    inputs = make_inputs(tokens=tokens)
    mask = torch.rand(tokens) > 0.3
    weights = torch.randn(tokens) if reduction == "none" else torch.ones(())
    got = fused_linear_kl(*inputs, mask=mask, reduction=reduction, chunk_size=4, backend=backend)
    grads = torch.autograd.grad((got * weights).sum(), inputs)
    expected_inputs = [t.detach().double().requires_grad_() for t in inputs]
    expected = unfused(*expected_inputs, mask=mask, reduction=reduction)
    expected_grads = torch.autograd.grad((expected * weights.double()).sum(), expected_inputs)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), reference, rtol=1e-4, atol=1e-6)


def test_non_contiguous_hidden_states():
    generator = torch.Generator().manual_seed(1)
    hidden_p = torch.randn(16, 12, generator=generator, dtype=torch.float64).t().requires_grad_()
    hidden_q = (hidden_p.detach() + 0.1 * torch.randn(12, 16, generator=generator, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(40, 16, generator=generator, dtype=torch.float64).requires_grad_()
    got = torch.autograd.grad(fused_linear_kl(hidden_p, hidden_q, weight, chunk_size=5), (hidden_p, hidden_q, weight))
    expected = torch.autograd.grad(unfused(hidden_p, hidden_q, weight), (hidden_p, hidden_q, weight))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_gradcheck_fp64():
    inputs = [t.detach().double()[:, :] for t in make_inputs(tokens=5, hidden=4, vocab=7)]
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(
        lambda a, b, w: fused_linear_kl(a, b, w, reduction="none", chunk_size=2), inputs)


def fused_and_unfused_peaks(inputs, chunk, backend="chunked"):
    """Peak live tensor bytes of forward + backward, fused and unfused (TensorMemory)."""
    peaks = {}
    for name, fn in (("fused", lambda: fused_linear_kl(*inputs, chunk_size=chunk, backend=backend)),
                     ("unfused", lambda: kl_div_logits(inputs[0] @ inputs[2].t(),
                                                       inputs[1] @ inputs[2].t(), backend=backend))):
        with TensorMemory() as memory:
            fn().backward()
        peaks[name] = (memory.peak_bytes, memory.largest_bytes)
        for tensor in inputs:
            tensor.grad = None
    return peaks


def test_never_materializes_full_logits():
    tokens, hidden, vocab, chunk = 2048, 64, 4000, 64
    peaks = fused_and_unfused_peaks(make_inputs(tokens=tokens, hidden=hidden, vocab=vocab), chunk)
    assert peaks["unfused"][1] >= tokens * vocab * 4
    assert peaks["fused"][1] <= 2 * chunk * vocab * 4, peaks     # one chunk of both sides' logits
    assert peaks["fused"][0] * 8 <= peaks["unfused"][0], peaks


def test_peak_memory_does_not_grow_with_tokens():
    """Only the [T, H] gradients and [T] outputs grow with T; nothing of size T·V does."""
    hidden, vocab, chunk = 64, 4000, 64
    peak = {tokens: fused_and_unfused_peaks(make_inputs(tokens=tokens, hidden=hidden, vocab=vocab),
                                            chunk)["fused"][0] for tokens in (512, 2048)}
    growth_per_token = 2 * hidden * 4 + 8 * 4          # ∂hidden_p, ∂hidden_q rows + a few [T] fp32
    assert peak[2048] - peak[512] <= (2048 - 512) * growth_per_token, peak


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-6, 1e-4), (torch.bfloat16, 2e-3, 2e-2)],
                         ids=["fp32", "bf16"])
def test_backward_peak_within_documented_budget(dtype, atol, rtol, monkeypatch):
    """The module docstring's bound: logits of one chunk (both sides) + the fp32 ∂weight
    accumulator + one [WEIGHT_GRAD_BLOCK, H] partial product (+ the outputs and, for the chunked
    backend, its fp32 block temporaries). A full [V, H] temporary would break it."""
    monkeypatch.setattr(fused_linear_kl_module, "WEIGHT_GRAD_BLOCK", 1024)
    tokens, hidden, vocab, chunk = 16, 128, 8192, 4
    hidden_p, hidden_q, weight = (t.detach() for t in make_inputs(tokens, hidden, vocab, dtype))
    kl, lse_p, lse_q = fused_linear_kl_module.fused_linear_kl_forward(hidden_p, hidden_q, weight, chunk)
    size, fp32 = dtype.itemsize, dtype == torch.float32
    budget = (2 * chunk * vocab * size + vocab * hidden * 4      # logits, ∂weight accumulator
              + (0 if fp32 else 1024 * hidden * size)            # partial product (addmm_ if fp32)
              + 2 * chunk * hidden * size                        # the chunk's hidden rows
              + 4 * chunk * vocab * 4                            # chunked backend: 3 fp32 blocks + a mask
              + (0 if fp32 else vocab * hidden * size)           # ∂weight cast to bf16
              + 2 * tokens * hidden * size                       # ∂hidden_p, ∂hidden_q
              + 4096)                                            # [T] vectors, scalars
    with TensorMemory() as memory:
        grads = fused_linear_kl_module.fused_linear_kl_backward(
            torch.ones(tokens), hidden_p, hidden_q, weight, lse_p, lse_q, kl, chunk, "chunked")
    assert memory.peak_bytes <= budget, (memory.peak_bytes, budget)
    expected = [t.double().requires_grad_() for t in (hidden_p, hidden_q, weight)]
    reference = torch.autograd.grad(unfused(*expected, reduction="sum"), expected)
    for name, grad, want in zip(("hidden_p", "hidden_q", "weight"), grads, reference):
        assert_verbose_allclose(grad, want, atol=atol, rtol=rtol, name=name)


@pytest.mark.parametrize("backend", ["chunked", pytest.param(
    "triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")), pytest.param(
    "cpu", marks=pytest.mark.skipif(not HAS_KL_CPU, reason="mlan_kernels._C is not built"))])
def test_row_backward_in_place_allocates_no_logit_sized_tensor(backend):
    rows, vocab = 6, 300
    generator = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(2, rows, vocab, generator=generator)
    grad_kl = torch.randn(rows, generator=generator)
    kl, lse_p, lse_q = kl_rows_forward(logits_p, logits_q, None, backend)
    expected = kl_rows_backward(grad_kl, logits_p, logits_q, None, lse_p, lse_q, kl, backend)
    with TensorMemory() as memory:
        got = kl_rows_backward(grad_kl, logits_p, logits_q, None, lse_p, lse_q, kl, backend, inplace=True)
    assert got[0].data_ptr() == logits_p.data_ptr() and got[1].data_ptr() == logits_q.data_ptr()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    limit = 4 * rows * vocab * 4 if backend == "chunked" else 0   # chunked: 3 fp32 blocks + a mask
    assert memory.peak_bytes <= limit + rows * 4 * 4, memory.peak_bytes
    if backend == "chunked":
        assert memory.largest_bytes < rows * vocab * 4 * 2


def test_row_backward_in_place_rejects_a_mask():
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="inplace=True needs contiguous logits and mask=None"):
        kl_rows_backward(torch.ones(2), logits, logits.clone(), torch.ones(2, dtype=torch.bool),
                         torch.zeros(2), torch.zeros(2), torch.zeros(2), "chunked", inplace=True)


@pytest.mark.parametrize("tokens, hidden, vocab, expected", [
    (4096, 512, 32000, 128), (8192, 4096, 32000, 1024), (10, 16, 300, 64), (0, 16, 300, 64),
    (8192, 1, 32, 256)])                                  # H = 1: 32 vocabulary rows per hidden
def test_auto_chunk_size_follows_the_documented_rule(tokens, hidden, vocab, expected):
    assert fused_linear_kl_module.auto_chunk_size(tokens, hidden, vocab) == expected


@pytest.mark.parametrize("tokens, hidden, vocab, chunk", [
    (200, 8, 64, 64),       # 200 / (64 / 8) = 25 tokens -> the 64-token minimum
    (1000, 1, 4, 256)])     # 1000 / (4 / 1) = 250 -> the next power of 2
def test_default_chunk_is_the_auto_chunk(monkeypatch, tokens, hidden, vocab, chunk):
    inputs = make_inputs(tokens=tokens, hidden=hidden, vocab=vocab)
    chunk_sizes = []
    token_chunks = fused_linear_kl_module._token_chunks
    monkeypatch.setattr(fused_linear_kl_module, "_token_chunks",
                        lambda total, size: chunk_sizes.append(size) or token_chunks(total, size))
    torch.testing.assert_close(fused_linear_kl(*inputs), fused_linear_kl(*inputs, chunk_size=chunk))
    assert chunk_sizes == [chunk, chunk]


def test_opcheck():
    hidden_p, hidden_q, weight = (t.detach() for t in make_inputs(tokens=6, vocab=20))
    torch.library.opcheck(fused_linear_kl_op, (hidden_p, hidden_q, weight, 4, "chunked"))
    kl, lse_p, lse_q = fused_linear_kl_op(hidden_p, hidden_q, weight, 4, "chunked")
    torch.library.opcheck(fused_linear_kl_backward_op,
                          (torch.randn(6), hidden_p, hidden_q, weight, lse_p, lse_q, kl, 4, "chunked"))
    transposed_p, transposed_q = (t.t().contiguous().t() for t in (hidden_p, hidden_q))   # strides (1, 6)
    torch.library.opcheck(fused_linear_kl_backward_op, (torch.randn(6), transposed_p, transposed_q, weight,
                                                        lse_p, lse_q, kl, 4, "chunked"))


@pytest.mark.parametrize("args, message", [
    (dict(chunk_size=0), "chunk_size must be a positive int or None, got 0"),
    (dict(chunk_size=2.0), "chunk_size must be a positive int or None, got 2.0"),
    (dict(lm_head_weight=torch.zeros(30, 5)),
     "hidden_p must be [..., H] with H = lm_head_weight.shape[1] = 5, got [4, 16]"),
    (dict(lm_head_weight=torch.zeros(30, 16, dtype=torch.float64)),
     "lm_head_weight must match hidden_p's dtype/device (torch.float32, cpu), got (torch.float64, cpu)"),
    (dict(lm_head_weight=torch.zeros(30, 16, device="meta")),
     "lm_head_weight must match hidden_p's dtype/device (torch.float32, cpu), got (torch.float32, meta)"),
    (dict(hidden_q=torch.zeros(5, 16)), "hidden_q must have hidden_p's shape [4, 16], got [5, 16]"),
    (dict(lm_head_weight=torch.zeros(30)), "lm_head_weight must be a [V, H] tensor, got [30]"),
    (dict(lm_head_weight=[[0.0] * 16]), "lm_head_weight must be a [V, H] tensor, got list"),
    (dict(mask=torch.ones(5, dtype=torch.bool)),
     "mask must be a tensor of shape [4] (hidden_p without its last dim), got [5]"),
    (dict(backend="fused"), "backend must be one of ('auto', 'triton', 'cpu', 'chunked'), got 'fused' "
                            "(argument `backend` or env MLAN_KL_BACKEND)"),
])
def test_errors_name_the_argument(args, message):
    call = dict(hidden_p=torch.zeros(4, 16), hidden_q=torch.zeros(4, 16), lm_head_weight=torch.zeros(30, 16))
    call.update(args)
    with pytest.raises((TypeError, ValueError), match="^" + re.escape(message) + "$"):
        fused_linear_kl(**call)


@pytest.mark.gpu
def test_gpu_peak_memory_bf16():
    """Issue 6 target: fused peak <= 1/8 of unfused at T=4096, H=512, V=32000 bf16.
    Each path runs once first, so one-time cuBLAS workspaces are not charged to either."""
    tokens, hidden, vocab = 4096, 512, 32000
    inputs = [t.detach().cuda().requires_grad_() for t in make_inputs(tokens, hidden, vocab, torch.bfloat16)]
    paths = (("fused", lambda: fused_linear_kl(*inputs)),          # auto chunk: 128
             ("unfused", lambda: kl_div_logits(inputs[0] @ inputs[2].t(), inputs[1] @ inputs[2].t())))
    peaks = {}
    for warm_up in (True, False):
        for name, fn in paths:
            for tensor in inputs:
                tensor.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn().backward()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - base
    assert peaks["fused"] * 8 <= peaks["unfused"], peaks


def test_torch_compile_uses_the_custom_op():
    inputs = make_inputs(tokens=10, vocab=40)
    compiled = torch.compile(lambda a, b, w: fused_linear_kl(a, b, w, chunk_size=4, backend="chunked"),
                             backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    expected = torch.autograd.grad(fused_linear_kl(*inputs, chunk_size=4, backend="chunked"), inputs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
