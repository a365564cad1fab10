"""Triton backend on a real GPU: bf16 (which the CPU interpreter cannot check), fp16, fp32,
at paper-sized hidden dims. Skipped without CUDA (see conftest.py); run on the lent GPU."""
import pytest
import torch

from mlan_kernels.ops.mm_adapter import mm_adapter
from mlan_kernels.reference import mm_adapter_reference

from helpers import assert_close_to_reference, make_adapter_inputs, random_grad

pytestmark = pytest.mark.gpu

PARAMS = ("down_weight", "down_bias", "up_weight", "up_bias", "router_weight", "router_bias")


def _inputs(batch, length, dim, rank, experts, groups, dtype, same_routing=False):
    """x [B, L, D] (dtype), the six parameters (fp32) and ∂y (dtype), on the GPU."""
    inputs = make_adapter_inputs(batch, length, dim, rank, experts, groups, dtype, "cuda",
                                 param_dtype=torch.float32, single_modality=same_routing)
    return inputs["x"], [inputs[name] for name in PARAMS], random_grad((batch, length, dim), dtype, "cuda")


def _run(fn, x, params, grad_y):
    leaves = [x.detach().clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in params]
    y = fn(*leaves)
    y.backward(grad_y.to(y.dtype))
    return [y] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dim,experts,groups,rank", [(4096, 2, 2, 8), (1024, 3, 1, 8), (5120, 2, 2, 16)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_triton_matches_reference_on_gpu(dtype, dim, experts, groups, rank, dropout_p):
    x, params, grad_y = _inputs(4, 300, dim, rank, experts, groups, dtype)
    kwargs = dict(scale=1.0, temperature=5.0, dropout_p=dropout_p, seed=11, groups=groups)
    got = _run(lambda *a: mm_adapter(*a, backend="triton", **kwargs), x, params, grad_y)
    # Oracle in fp64 on the same (dtype-rounded) inputs.
    want = _run(lambda x, *p: mm_adapter_reference(x.double(), *(q.double() for q in p), **kwargs)[0],
                x, params, grad_y)
    names = ["y", "x", "down_weight", "down_bias", "up_weight", "up_bias", "router_weight", "router_bias"]
    for name, a, b in zip(names, got, want):
        assert_close_to_reference(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_single_modality_path_equals_general_path_on_gpu(dtype):
    x, params, _ = _inputs(8, 256, 4096, 8, 2, 2, dtype, same_routing=True)
    # (True: the combined-U path; None would run the general path too, without comparing)
    fast = mm_adapter(x, *params, groups=2, backend="triton", single_modality=True)
    general = mm_adapter(x, *params, groups=2, backend="triton", single_modality=False)
    assert_close_to_reference(fast, general, dtype, "y")


def test_dispatcher_picks_triton_for_cuda_tensors():
    from mlan_kernels.dispatch import select_backend
    assert select_backend(torch.device("cuda"), torch.bfloat16) == "triton"


def test_compiled_module_on_gpu_matches_eager():
    torch._dynamo.reset()
    x, params, _ = _inputs(2, 64, 1024, 8, 2, 2, torch.bfloat16)
    fn = lambda x: mm_adapter(x, *params, groups=2, backend="triton")
    assert torch.equal(torch.compile(fn, fullgraph=True)(x), fn(x))
