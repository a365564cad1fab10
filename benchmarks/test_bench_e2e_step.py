"""pytest-benchmark: one end-to-end train step per variant on the "tiny" preset (D=128, 2 layers,
batch 2 x seq 64), plus a check that the fused and the LaVIN-eager adapters train identically.

    pytest benchmarks/test_bench_e2e_step.py --benchmark-disable   # correctness only, seconds
The full-size numbers come from `python -m mlan_bench.e2e_step` (see its docstring).
"""
import pytest
import torch

from mlan_bench.e2e_step import VARIANTS, TrainStep

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("variant", VARIANTS)
def test_e2e_step(benchmark, variant):
    step = TrainStep(variant, "tiny", DEVICE, torch.float32)
    loss = benchmark(lambda: step().item())     # .item() waits for the GPU
    assert loss > 0 and loss < float("inf")


def _randomized(variant):
    """A dropout-free TrainStep whose adapters have random (non-zero) parameters, seed 0."""
    step = TrainStep(variant, "tiny", DEVICE, torch.float32, dropout_p=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in step.trainable:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return step


def test_fused_matches_eager_first_step():
    """Same loss and gradients on the first step: fails if the two variants diverge."""
    fused, eager = _randomized("fused"), _randomized("eager_adapters")
    assert [p.shape for p in fused.trainable] == [p.shape for p in eager.trainable]
    torch.testing.assert_close(fused(), eager(), rtol=1e-5, atol=1e-6)
    for index, (ours, theirs) in enumerate(zip(fused.trainable, eager.trainable)):
        assert ours.grad is not None and ours.grad.abs().sum() > 0, f"parameter {index}: no gradient"
        # The loss is a mean over B*S*D elements, so gradients are ~1e-5: scale atol to them.
        atol = 1e-5 * float(theirs.grad.abs().max())
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=atol,
                                   msg=lambda text: f"parameter {index} {list(ours.shape)}: {text}")
