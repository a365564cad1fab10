"""Launches per call of the KL, fused-linear-KL and grad-scale ops on their Triton paths (issue
19), counted like the MM-Adapter's (tests/launch_counter.py), under the Triton interpreter.
The counts are the README's table; a change that adds a launch fails here first. Host reads:
none in any of them.

What the counts include: every aten compute op (on GPU one launch each) between the call and
the gradients, with the output gradient made beforehand (a loss's backward would add the
ones_like fill). fused_linear_kl costs a fixed part plus a part per token chunk: measured with
one and with two chunks. grad scaling is counted on a second call with the same parameters
(the first builds and uploads its block tables, cached per parameter set); on CUDA it adds one
host-to-device copy of the G multipliers per call, which the CPU run cannot see.
"""
import importlib

import pytest
import torch

from helpers import HAS_TRITON
from launch_counter import counting, wrap_kernels
from mlan_kernels import fused_linear_kl, kl_div_logits, scale_grads_

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="no triton")
_KL = importlib.import_module("mlan_kernels.ops.kl_div")
_LINEAR_KL = importlib.import_module("mlan_kernels.ops.fused_linear_kl")
_WRAPPERS = {"mlan.kl_div_logits.default": _KL.kl_rows_forward,
             "mlan.kl_div_logits_backward.default": _KL.kl_rows_backward,
             "mlan.fused_linear_kl.default": _LINEAR_KL.fused_linear_kl_forward,
             "mlan.fused_linear_kl_backward.default": _LINEAR_KL.fused_linear_kl_backward}

# Launches per forward+backward (KL ops) or per call (grad scaling), as measured here. Before
# issue 19: KL 8 (15 with a mask), fused linear KL 10 + 12 per chunk; the zero-filled
# gradients of lse_p/lse_q, the copies of the mask and of the expanded ∂kl are gone since.
KL_LAUNCHES = {"no mask": 5, "mask": 11}
FUSED_LINEAR_KL_LAUNCHES = {"fixed": 8, "per chunk": 12}
GRAD_SCALE_LAUNCHES = {"no clipping": 5, "max_norm": 10}      # one dtype, any number of groups


@pytest.fixture
def kl_box(monkeypatch):
    import mlan_kernels.backends.kl_triton as backend
    from mlan_kernels.triton import kl_kernels
    return wrap_kernels(monkeypatch, backend, kl_kernels)


def _forward_backward(box, fn, inputs):
    leaves = [value.detach().requires_grad_() for value in inputs]
    out = fn(*leaves)
    grad_out = torch.ones_like(out)
    with counting(box, _WRAPPERS) as counter:
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, grad_out)
    assert not counter.host_reads, counter.host_reads
    return counter


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kl_div_logits_launches(kl_box, dtype, masked):
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 6, 50, generator=generator).to(dtype) for _ in range(2)]
    mask = torch.rand(2, 6, generator=generator) > 0.3 if masked else None
    counter = _forward_backward(kl_box, lambda p, q: kl_div_logits(p, q, mask, backend="triton"),
                                logits)
    print(f"\nkl_div_logits {dtype} mask={masked}: {counter.summary()}")
    assert counter.triton == ["kl_forward_kernel", "kl_backward_kernel"]
    assert counter.launches == KL_LAUNCHES["mask" if masked else "no mask"], counter.summary()


def test_fused_linear_kl_launches(kl_box):
    generator = torch.Generator().manual_seed(0)
    hidden = [torch.randn(12, 16, generator=generator) for _ in range(2)]
    weight = torch.randn(40, 16, generator=generator)
    counts = {}
    for chunks in (1, 2):
        counter = _forward_backward(
            kl_box, lambda p, q, w: fused_linear_kl(p, q, w, chunk_size=12 // chunks, backend="triton"),
            hidden + [weight])
        print(f"\nfused_linear_kl, {chunks} chunk(s): {counter.summary()}")
        counts[chunks] = counter.launches
    per_chunk = counts[2] - counts[1]
    assert (counts[1] - per_chunk, per_chunk) == tuple(FUSED_LINEAR_KL_LAUNCHES.values()), counts


@pytest.mark.parametrize("max_norm", [None, 1.0], ids=["no clipping", "max_norm"])
def test_grad_scale_launches(monkeypatch, max_norm):
    import mlan_kernels.backends.grad_scale_triton as backend
    from mlan_kernels.triton import grad_scale_kernels
    box = wrap_kernels(monkeypatch, backend, grad_scale_kernels)
    generator = torch.Generator().manual_seed(0)
    groups = [[torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
              for shapes in ([(8, 64), (8,)], [(3, 5), (7,), (2, 9)], [(4,)])]
    for param in (param for group in groups for param in group):
        param.grad = torch.randn(param.shape, generator=generator)
    scale_grads_(groups, [0.5, 2.0, 1.0], max_norm=max_norm, backend="triton")  # builds the tables
    with counting(box) as counter:
        scale_grads_(groups, [0.5, 2.0, 1.0], max_norm=max_norm, backend="triton")
    print(f"\nscale_grads_ max_norm={max_norm}: {counter.summary()}")
    assert not counter.host_reads
    assert counter.triton == ["sum_squares_kernel", "scale_kernel"]
    assert counter.launches == GRAD_SCALE_LAUNCHES["max_norm" if max_norm else "no clipping"], \
        counter.summary()
