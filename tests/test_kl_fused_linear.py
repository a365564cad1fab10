"""fused_linear_kl: equals the unfused KL of hidden·Wᵀ logits (values and gradients), never
allocates a [T, V] tensor (CPU peak-memory proxy), opcheck of its registered ops."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlan_kernels.ops.kl_div import (fused_linear_kl, fused_linear_kl_backward_op,
                                     fused_linear_kl_op, kl_div_logits)
from mlan_kernels.reference_kl import kl_div_logits_reference

from helpers import HAS_TRITON

pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (bytes) any non-view op creates while active: a CPU stand-in
    for torch.cuda.max_memory_allocated that needs no allocator hooks."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:                       # aliases of existing memory allocate nothing
            return out
        for value in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel() * value.element_size())
        return out


def make_inputs(tokens=24, hidden=16, vocab=300, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden_p = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    hidden_q = hidden_p + 0.3 * torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) / hidden ** 0.5
    return [t.to(dtype).requires_grad_() for t in (hidden_p, hidden_q, weight)]


def unfused(hidden_p, hidden_q, weight, mask=None, reduction="batchmean"):
    return kl_div_logits_reference(hidden_p @ weight.t(), hidden_q @ weight.t(), mask, reduction)


@pytest.mark.parametrize("backend", ["chunked", pytest.param(
    "triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))])
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


def test_gradcheck_fp64():
    inputs = [t.detach().double()[:, :] for t in make_inputs(tokens=5, hidden=4, vocab=7)]
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(
        lambda a, b, w: fused_linear_kl(a, b, w, reduction="none", chunk_size=2), inputs)


def test_never_materializes_full_logits():
    tokens, hidden, vocab, chunk = 256, 16, 1000, 32
    inputs = make_inputs(tokens=tokens, hidden=hidden, vocab=vocab)
    peaks = {}
    for name, fn in (("fused", lambda: fused_linear_kl(*inputs, chunk_size=chunk)),
                     ("unfused", lambda: kl_div_logits(inputs[0] @ inputs[2].t(),
                                                       inputs[1] @ inputs[2].t()))):
        with LargestTensor() as probe:
            fn().backward()
        peaks[name] = probe.largest
    full_logits = tokens * vocab * 4
    assert peaks["unfused"] >= full_logits
    assert peaks["fused"] <= chunk * vocab * 4, peaks     # one chunk of fp32 logits at most
    assert peaks["fused"] * 8 <= peaks["unfused"], peaks


def test_opcheck():
    hidden_p, hidden_q, weight = (t.detach() for t in make_inputs(tokens=6, vocab=20))
    torch.library.opcheck(fused_linear_kl_op, (hidden_p.requires_grad_(), hidden_q.requires_grad_(),
                                               weight.requires_grad_(), 4, "chunked"))
    hidden_p, hidden_q, weight = (t.detach() for t in (hidden_p, hidden_q, weight))
    kl, lse_p, lse_q = fused_linear_kl_op(hidden_p, hidden_q, weight, 4, "chunked")
    torch.library.opcheck(fused_linear_kl_backward_op,
                          (torch.randn(6), hidden_p, hidden_q, weight, lse_p, lse_q, kl, 4, "chunked"))


@pytest.mark.parametrize("args, message", [
    (dict(chunk_size=0), "chunk_size must be"),
    (dict(lm_head_weight=torch.zeros(30, 5)), "hidden_p must be"),
    (dict(lm_head_weight=torch.zeros(30, 16, dtype=torch.float64)), "lm_head_weight must have"),
    (dict(hidden_q=torch.zeros(5, 16)), "hidden_q must have hidden_p's shape"),
    (dict(lm_head_weight=torch.zeros(30)), r"lm_head_weight must be a \[V, H\]"),
])
def test_errors_name_the_argument(args, message):
    call = dict(hidden_p=torch.zeros(4, 16), hidden_q=torch.zeros(4, 16), lm_head_weight=torch.zeros(30, 16))
    call.update(args)
    with pytest.raises((TypeError, ValueError), match=message):
        fused_linear_kl(**call)


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, reason="issue 6 target (fused peak <= 1/8 of unfused) not met yet: "
                   "H100 2026-11-23 measured fused 275,351,040 B vs unfused 1,048,675,840 B (3.8x)")
def test_gpu_peak_memory_bf16():
    tokens, hidden, vocab = 4096, 512, 32000
    inputs = [t.detach().cuda().requires_grad_() for t in make_inputs(tokens, hidden, vocab, torch.bfloat16)]
    peaks = {}
    for name, fn in (("fused", lambda: fused_linear_kl(*inputs, chunk_size=256)),
                     ("unfused", lambda: kl_div_logits(inputs[0] @ inputs[2].t(), inputs[1] @ inputs[2].t()))):
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
