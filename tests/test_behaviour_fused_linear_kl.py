"""fused_linear_kl in 16 bits over many chunks and vocabulary blocks: every chunk's contribution
reaches ∂weight (and ∂hidden). Tolerance in flash-attention's form: our error against an fp64
oracle is at most a few times PyTorch's own error for the same unfused math in that dtype."""
import importlib

import pytest
import torch

from mlan_kernels.ops.fused_linear_kl import fused_linear_kl
from mlan_kernels.reference import kl_div_logits_reference

from helpers import HAS_KL_CPU

fused_linear_kl_module = importlib.import_module("mlan_kernels.ops.fused_linear_kl")
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")


def gradients(hidden_p, hidden_q, weight, mask, loss_weights, fn):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden_p, hidden_q, weight)]
    rows = fn(*leaves)
    return torch.autograd.grad((rows * loss_weights.to(rows.dtype)).sum(), leaves)


def unfused(hidden_p, hidden_q, weight, mask):
    return kl_div_logits_reference(hidden_p @ weight.t(), hidden_q @ weight.t(), mask, "none")


def relative_error(got, want):
    return float(torch.linalg.vector_norm(got.double() - want) / torch.linalg.vector_norm(want))


@pytest.mark.parametrize("backend", ["chunked", pytest.param(
    "cpu", marks=pytest.mark.skipif(not HAS_KL_CPU, reason="mlan_kernels._C is not built"))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multi_chunk_16_bit_gradients_match_the_fp64_oracle(dtype, backend, monkeypatch):
    monkeypatch.setattr(fused_linear_kl_module, "WEIGHT_GRAD_BLOCK", 128)   # 5 vocabulary blocks
    tokens, hidden, vocab, chunk = 40, 32, 600, 4                             # 10 token chunks
    generator = torch.Generator().manual_seed(11)
    hidden_p = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    hidden_q = hidden_p + 0.5 * torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    weight = 2 * torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) / hidden ** 0.5
    mask = torch.rand(tokens, generator=generator) > 0.2
    loss_weights = torch.rand(tokens, generator=generator, dtype=torch.float64) + 0.5
    low = [t.to(dtype) for t in (hidden_p, hidden_q, weight)]
    oracle = gradients(*[t.to(dtype).double() for t in low], mask, loss_weights, lambda *t: unfused(*t, mask))
    torch_own = gradients(*low, mask, loss_weights, lambda *t: unfused(*t, mask))
    ours = gradients(*low, mask, loss_weights, lambda p, q, w: fused_linear_kl(
        p, q, w, mask=mask, reduction="none", chunk_size=chunk, backend=backend))
    for name, got, baseline, want in zip(("hidden_p", "hidden_q", "weight"), ours, torch_own, oracle):
        assert got.dtype == dtype
        bound = 3 * relative_error(baseline, want) + 1e-3
        assert relative_error(got, want) <= bound, (name, relative_error(got, want), bound)
