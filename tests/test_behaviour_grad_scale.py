"""scale_grads_ as a user relies on it (ops/grad_scale.py and its backends).

* After clipping, every group's gradient norm is at most max_norm, with no tolerance, also for
  small gradients (where the eps of the clip factor is a visible fraction of the norm).
* A group none of whose parameters has a gradient yet (a frozen side, an unused branch) has
  norm 0 and leaves the other groups' scaling as it is, wherever it stands.
* groups must be a sequence of sequences: an iterator (e.g. model.parameters()) is refused.
* The norms are fp32 (also with no gradient at all, and under a float64 default dtype); the
  triton backend refuses non-contiguous grads by name, before touching any.
* Without clipping every backend scales each grad bit for bit as torch's `mul_` does, under
  any default dtype.
"""
import re

import pytest
import torch
from torch import nn

from mlan_kernels.ops.grad_scale import scale_grads_
from mlan_kernels.reference import scale_grads_reference

from helpers import HAS_TRITON, default_dtype

BACKENDS = ["foreach", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]


def parameter(grad):
    param = nn.Parameter(torch.zeros_like(grad))
    param.grad = grad.clone()
    return param


def group_norm(params):
    return torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in params]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [1e-3, 1.0, 50.0])
def test_after_clipping_every_group_norm_is_at_most_max_norm(backend, size):
    """Within fp32 rounding (the clip factor is fp32): 1e-6 of max_norm, where the eps of the
    factor is 1e-6 / 0.012 of the smallest norms."""
    generator = torch.Generator().manual_seed(0)
    groups = [[parameter(torch.randn(shape, generator=generator) * size)
               for shape in ((16, 8), (8,))] for _ in range(2)]
    max_norm = 0.5 * float(group_norm(groups[0]))              # group 0 above it, group 1 maybe
    norms = scale_grads_(groups, [1.0, 1.0], max_norm=max_norm, backend=backend)
    assert norms[0] > max_norm
    for params in groups:
        assert group_norm(params) <= max_norm * (1 + 1e-6)
    assert group_norm(groups[0]) >= max_norm * (1 - 1e-4)       # clipped onto it, not below


@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_float64_gradients_are_scaled_like_the_reference(max_norm):
    """fp64 grads beside fp32 ones and a group without grads: fp32 norms, every grad scaled in
    its own dtype (the foreach backend used to refuse fp64 grads)."""
    generator = torch.Generator().manual_seed(2)
    made = [[torch.randn(4, 3, generator=generator, dtype=torch.float64),
             torch.randn(3, generator=generator, dtype=torch.float64)],
            [torch.randn(5, generator=generator)]]
    ours, reference = ([[parameter(grad) for grad in grads] for grads in made] + [[nn.Parameter(torch.zeros(2))]]
                       for _ in range(2))
    norms = scale_grads_(ours, [0.5, 2.0, 1.0], max_norm=max_norm)
    expected = scale_grads_reference(reference, [0.5, 2.0, 1.0], max_norm=max_norm)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, expected)
    for got, want in zip(ours[:2], reference[:2]):
        for p, q in zip(got, want):
            assert p.grad.dtype == q.grad.dtype
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty", [0, 1, 2])
def test_a_group_without_gradients_has_norm_zero_and_changes_nothing_else(backend, empty, device):
    generator = torch.Generator().manual_seed(1)
    made = [[parameter(torch.randn(5, generator=generator))] for _ in range(2)]
    ours = [[parameter(p.grad.to(device)) for p in params] for params in made]
    reference = [[parameter(p.grad) for p in params] for params in made]
    for groups in (ours, reference):
        groups.insert(empty, [nn.Parameter(torch.zeros(3))])     # no .grad
    multipliers = [0.5, 2.0, 3.0]
    norms = scale_grads_(ours, multipliers, max_norm=1.0, backend=backend)
    expected = scale_grads_reference(reference, multipliers, max_norm=1.0)
    assert norms[empty] == 0 and norms.shape == (3,) and norms.device.type == device
    torch.testing.assert_close(norms.cpu(), expected)
    for got, want in zip(ours, reference):
        for p, q in zip(got, want):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                torch.testing.assert_close(p.grad.cpu(), q.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_16_bit_gradients_beyond_their_range_have_a_finite_norm(backend):
    """fp16 grads of a loss-scaled step: each element fits fp16, the norm (~1.2e5) does not;
    accumulated in fp32 it is finite, and clipping scales them to max_norm."""
    grad = torch.full((4, 4096), 900.0, dtype=torch.float16)
    ours, reference = [[parameter(grad)]], [[parameter(grad)]]
    norms = scale_grads_(ours, [1.0], max_norm=1.0, backend=backend)
    expected = scale_grads_reference(reference, [1.0], max_norm=1.0)
    assert torch.isfinite(norms).all() and float(norms[0]) > 65504
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours[0][0].grad, reference[0][0].grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_gradient_in_all_groups(backend):
    lone = parameter(torch.tensor([3.0, 4.0]))
    norms = scale_grads_([[nn.Parameter(torch.zeros(2))], [lone]], [1.0, 2.0], backend=backend)
    assert norms.tolist() == [0.0, 5.0] and lone.grad.tolist() == [6.0, 8.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_gradients_count_as_zero_beside_others(backend):
    """A zero-element gradient (an fp16 one, bucketed first by the triton backend) adds 0 to its
    group's norm and leaves the other dtypes' grads to be scaled."""
    empty, lone = parameter(torch.zeros(0, 4, dtype=torch.float16)), parameter(torch.tensor([3.0, 4.0]))
    norms = scale_grads_([[empty], [lone]], [1.0, 2.0], backend=backend)
    assert norms.tolist() == [0.0, 5.0] and lone.grad.tolist() == [6.0, 8.0]
    assert empty.grad.shape == (0, 4) and empty.grad.dtype == torch.float16


def test_groups_must_be_a_sequence_not_an_iterator():
    model = nn.Linear(2, 2)
    for groups in (model.parameters(), torch.zeros(3), {"a": []}.values()):
        with pytest.raises(TypeError, match="^groups must be a sequence of parameter sequences$"):
            scale_grads_(groups, [1.0])


def test_no_groups_give_an_empty_fp32_norm_vector():
    """Zero groups (a model with nothing to balance): the op and the oracle both return [0] fp32."""
    for norms in (scale_grads_([], []), scale_grads_reference([], [])):
        assert norms.shape == (0,) and norms.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_are_fp32_under_a_float64_default_dtype(backend):
    """The norms are fp32 whatever torch's default dtype is (the oracle's accumulator and the
    op's result alike), and the scaled fp32 grads match."""
    made = [torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0, 2.0])]
    ours, reference = ([[parameter(grad)] for grad in made] for _ in range(2))
    with default_dtype(torch.float64):
        norms = scale_grads_(ours, [1.0, 0.5], max_norm=2.0, backend=backend)
        expected = scale_grads_reference(reference, [1.0, 0.5], max_norm=2.0)
        without_grads = [scale(groups, [1.0] * len(groups)) for scale in (scale_grads_, scale_grads_reference)
                         for groups in ([], [[nn.Parameter(torch.zeros(2))]])]
    assert norms.dtype == expected.dtype == torch.float32
    assert [(n.dtype, n.tolist()) for n in without_grads] == [(torch.float32, []), (torch.float32, [0.0])] * 2
    torch.testing.assert_close(expected, torch.tensor([5.0, 3.0]))
    torch.testing.assert_close(norms, expected)
    for got, want in zip(ours, reference):
        torch.testing.assert_close(got[0].grad, want[0].grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_without_clipping_every_grad_is_exactly_torchs_product_with_its_multiplier(backend, dtype):
    """Without max_norm a grad becomes exactly `grad.mul_(multiplier)` as torch computes it (the
    product with the fp32 multiplier, rounded to the grad's dtype), bit for bit, whatever
    torch's default dtype is: choosing a backend changes no bit of an unclipped run."""
    generator = torch.Generator().manual_seed(3)
    made = [torch.randn(300, generator=generator).to(dtype),
            torch.randn(7, 5, generator=generator).to(dtype)]
    multipliers = [0.1, 1 / 3]                           # not exact in fp32
    for default in (torch.float32, torch.float64):
        groups = [[parameter(grad)] for grad in made]
        with default_dtype(default):
            scale_grads_(groups, multipliers, backend=backend)
        for (param,), grad, multiplier in zip(groups, made, multipliers):
            assert torch.equal(param.grad, grad.clone().mul_(multiplier)), (default, dtype)


@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_the_triton_backend_refuses_non_contiguous_grads_by_name():
    first, param = parameter(torch.full((5,), 2.0)), nn.Parameter(torch.zeros(3, 4))
    param.grad = torch.ones(4, 3).t()
    message = ("backend='triton' needs contiguous (torch.float32, torch.float16, torch.bfloat16) "
               "grads, got torch.float32 (contiguous=False)")
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        scale_grads_([[first], [param]], [0.5, 1.0], backend="triton")
    assert torch.equal(first.grad, torch.full((5,), 2.0))               # no group was scaled
