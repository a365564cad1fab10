"""scale_grads_: per-group norms, clipping and multipliers vs the plain loop of the oracle."""
import pytest
import torch
from torch import nn

from mlan_kernels.ops.grad_scale import scale_grads_
from mlan_kernels.reference import scale_grads_reference

from helpers import HAS_TRITON, assert_verbose_allclose

BACKENDS = ["foreach", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]


def make_groups(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [[(8, 64), (8,), (2, 64, 4)], [(3, 5), (7,)], [(4,)]]
    groups = []
    for group_shapes in shapes:
        params = []
        for shape in group_shapes:
            param = nn.Parameter(torch.zeros(shape, dtype=dtype))
            param.grad = torch.randn(shape, generator=generator).to(dtype)
            params.append(param)
        groups.append(params)
    groups[1].append(nn.Parameter(torch.zeros(3)))          # no .grad: skipped
    return groups


def grads(groups):
    return [p.grad.clone() for params in groups for p in params if p.grad is not None]


@pytest.mark.parametrize("max_norm", [None, 1.0, 1e6])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-6, 1e-5), (torch.float16, 1e-3, 2e-3)],
                         ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_plain_loop(backend, max_norm, dtype, atol, rtol):
    ours, reference = make_groups(dtype), make_groups(dtype)
    multipliers = [0.5, 2.0, 1.0]
    norms = scale_grads_(ours, multipliers, max_norm=max_norm, backend=backend)
    expected = scale_grads_reference(reference, multipliers, max_norm=max_norm)
    assert norms.dtype == torch.float32 and norms.shape == (3,)
    assert_verbose_allclose(norms, expected, atol=atol, rtol=rtol, name="norms")
    for index, (got, want) in enumerate(zip(grads(ours), grads(reference))):
        assert got.dtype == want.dtype == dtype
        assert_verbose_allclose(got, want, atol=atol, rtol=rtol, name=f"grad {index}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_bounds_group_norms(backend):
    groups = make_groups()
    half = nn.Parameter(torch.zeros(70, dtype=torch.float16))     # mixed dtypes in one group
    half.grad = torch.randn(70).half()
    groups[0].append(half)
    scale_grads_(groups, [1.0, 1.0, 1.0], max_norm=0.5, backend=backend)
    after = scale_grads_(groups, [1.0, 1.0, 1.0])
    assert (after <= 0.5 + 1e-5).all()


def test_empty_and_arguments():
    assert scale_grads_([[nn.Parameter(torch.zeros(2))]], [2.0]).tolist() == [0.0]
    with pytest.raises(ValueError, match="multipliers must have one value per group"):
        scale_grads_(make_groups(), [1.0])
    with pytest.raises(ValueError, match="max_norm"):
        scale_grads_(make_groups(), [1.0] * 3, max_norm=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        scale_grads_(make_groups(), [1.0] * 3, backend="cuda")
    with pytest.raises(TypeError, match="groups"):
        scale_grads_(torch.zeros(3), [1.0])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["foreach", "triton"])
def test_gpu_matches_plain_loop(backend):
    ours, reference = make_groups(), make_groups()
    for params in ours:
        for p in params:
            p.data, p.grad = p.data.cuda(), None if p.grad is None else p.grad.cuda()
    norms = scale_grads_(ours, [0.5, 2.0, 1.0], max_norm=1.0, backend=backend)
    expected = scale_grads_reference(reference, [0.5, 2.0, 1.0], max_norm=1.0)
    torch.testing.assert_close(norms.cpu(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads(ours), grads(reference)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_triton_tables_are_built_once_per_parameter_set_and_stay_correct():
    """A training loop calls scale_grads_ every step on the same parameters: the layout and
    address tables are built (and uploaded) once; a new grad storage gets a new address table
    and still the reference's result."""
    from mlan_kernels.backends import grad_scale_triton as grad_scale
    grad_scale._layout_tables.cache_clear()
    grad_scale._address_table.cache_clear()
    ours, reference = make_groups(), make_groups()

    def steps(count, layout_builds, address_builds):
        for _ in range(count):
            scale_grads_(ours, [0.5, 2.0, 1.0], max_norm=1.0, backend="triton")
            scale_grads_reference(reference, [0.5, 2.0, 1.0], max_norm=1.0)
        assert grad_scale._layout_tables.cache_info().misses == layout_builds
        assert grad_scale._address_table.cache_info().misses == address_builds
        for got, want in zip(grads(ours), grads(reference)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    steps(3, layout_builds=1, address_builds=1)
    ours[0][0].grad = ours[0][0].grad.clone()               # a new storage, same shapes
    reference[0][0].grad = reference[0][0].grad.clone()
    steps(1, layout_builds=1, address_builds=2)
