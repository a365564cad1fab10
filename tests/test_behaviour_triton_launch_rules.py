"""What every Triton backend launches on a GPU, checked on a CPU: the backends are made to
believe they run on a GPU (`interpreted` False, 132 multiprocessors) and are handed tensors on
the meta device, which have a device but no memory, so the launches are checked and not run
(tests/triton_launches.py). The launch rules hold for the GPU launch configuration:

* every buffer, table and seed a backend hands a kernel is on its inputs' device (on a GPU a
  host buffer is an illegal address, which the interpreter, all on the CPU, cannot see);
* block sizes and num_warps are powers of two (Triton compiles nothing else), also where the
  size is capped: vocabularies past 4096, more than 1024 rows per route, 2048-element blocks;
* fp32 activations keep fp32 accuracy on a GPU: their dots run 3xTF32, never plain TF32; 16-bit
  ones use their tensor cores at full speed (TF32 is ignored for 16-bit inputs);
* pass B of the MM-Adapter's backward gives the GPU at least 4 programs per multiprocessor
  (several row splits) when there are tokens enough;
* each backend launches the kernels its contract names, in order, and returns its results on
  the inputs' device with the documented shapes and dtypes (the MM-Adapter's fp32 ones also
  under a float64 default dtype).

The interpreted tests check the numbers, and (tests/conftest.py) every address each launch
reads or writes; the last test checks that checker: it stops the first access outside the
launch's tensors, before it happens, and lets masked-off lanes be.
"""
import os

import pytest
import torch

from helpers import HAS_TRITON, make_adapter_inputs
from triton_launches import CheckedKernel, check_launch_rules, check_launches, pretend_gpu

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="no triton")
META = torch.device("meta")


@pytest.fixture
def on_a_gpu(monkeypatch):
    """Make the Triton backends believe they run on a GPU with 132 multiprocessors; returns a
    function that checks a backend's launches and returns the list they are recorded in."""
    pretend_gpu(monkeypatch, 132)
    return lambda backend: check_launches(monkeypatch, backend)


@pytest.fixture
def float64_default():
    """torch's default dtype float64 during the test: the fp32 buffers must not follow it."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def on_meta(inputs):
    return {name: value.to(META) for name, value in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("routing", ["router", "weights", "by_first", "single_modality"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_the_mm_adapter_launches_legal_gpu_kernels_on_its_inputs_device(on_a_gpu, float64_default,
                                                                       dtype, routing, dropout_p):
    from mlan_kernels.backends import triton as backend
    launches = on_a_gpu(backend)
    batch, length, dim, rank, experts = 2, 1500, 4100, 16, 3       # 1500 > 1024 rows per route
    inputs = on_meta(make_adapter_inputs(batch, 2, dim, rank, experts, 1, dtype, "cpu"))
    x = torch.empty(batch, length, dim, dtype=dtype, device=META)
    f32 = dict(dtype=torch.float32, device=META)
    weights = torch.empty(batch, experts, **f32) if routing == "weights" else None
    seed = torch.tensor(7)                                          # the caller's host seed
    hyper = dict(scale=0.5, temperature=2.0, dropout_p=dropout_p, seed=seed, groups=1)
    y, h, routing_weights, saved = backend.forward_routed(
        x, inputs["down_weight"], inputs["down_bias"], inputs["up_weight"], inputs["up_bias"],
        inputs["router_weight"], inputs["router_bias"], weights,
        single_modality=routing == "single_modality", by_first=routing == "by_first", **hyper)
    grad_rw = torch.empty(batch, experts, **f32) if routing == "router" else None
    grad_x, *grads, routing_grads = backend.backward_routed(
        torch.empty_like(x), grad_rw, x, h, routing_weights, saved, inputs["down_weight"],
        inputs["down_bias"], inputs["up_weight"], inputs["up_bias"], inputs["router_weight"],
        weights, by_first=routing == "by_first", **hyper)

    assert [launch.name for launch in launches] == [
        "mm_adapter_prep_kernel", "mm_adapter_fwd_kernel", "mm_adapter_bwd_rows_kernel",
        "mm_adapter_bwd_cols_kernel", "mm_adapter_bwd_finalize_kernel"]
    for launch in launches:
        if "PRECISION" in launch.kwargs and dtype == torch.float32:
            assert launch.kwargs["PRECISION"].lower() in ("tf32x3", "ieee"), launch.name
    splits, column_blocks = launches[3].grid                       # pass B: 3000 tokens
    assert splits > 1 and splits * column_blocks >= 4 * 132
    assert y.shape == x.shape and y.dtype == dtype and grad_x.shape == x.shape
    assert h.shape == (batch, length, rank) and h.dtype == torch.float32
    assert routing_weights.shape == (batch, experts) and routing_weights.dtype == torch.float32
    expected = [inputs[name] for name in ("down_weight", "down_bias", "up_weight", "up_bias")]
    expected += [weights] if weights is not None else [inputs["router_weight"], inputs["router_bias"]]
    for got, parameter in zip([*grads, *routing_grads], expected):
        assert got.shape == parameter.shape and got.dtype == parameter.dtype
    for result in (y, h, routing_weights, saved, grad_x, *grads, *routing_grads):
        assert result.device == META


@pytest.mark.parametrize("vocab", [100, 50000])                     # 50000: capped at 4096
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_the_kl_launches_legal_gpu_kernels_on_its_inputs_device(on_a_gpu, vocab, masked, inplace):
    from mlan_kernels.backends import kl_triton as backend
    launches = on_a_gpu(backend)
    logits_p, logits_q = (torch.empty(6, vocab, dtype=torch.float16, device=META) for _ in "pq")
    mask = torch.empty(6, dtype=torch.bool, device=META) if masked else None
    kl, lse_p, lse_q = backend.forward(logits_p, logits_q, mask)
    grad_p, grad_q = backend.backward(torch.empty(6, device=META), logits_p, logits_q, mask, lse_p,
                                      lse_q, kl, inplace=inplace)
    assert [launch.name for launch in launches] == ["kl_forward_kernel", "kl_backward_kernel"]
    for result in (kl, lse_p, lse_q):
        assert result.shape == (6,) and result.dtype == torch.float32 and result.device == META
    for result in (grad_p, grad_q):
        assert result.shape == (6, vocab) and result.dtype == torch.float16
        assert result.device == META


@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_grad_scaling_launches_legal_gpu_kernels_on_its_grads_device(on_a_gpu, max_norm):
    from mlan_kernels.backends import grad_scale_triton as backend
    launches = on_a_gpu(backend)
    groups = [[torch.empty(5000, device=META), torch.empty(3, 7, dtype=torch.float16, device=META)],
              [torch.empty(4097, dtype=torch.float16, device=META)]]
    norms = backend.scale_grads(groups, [1.0, 0.5], max_norm, 1e-6)
    names = [launch.name for launch in launches]
    assert sorted(names) == ["scale_kernel"] * 2 + ["sum_squares_kernel"] * 2   # one per dtype
    assert names[:2] == ["sum_squares_kernel"] * 2                   # every norm before scaling
    assert norms.shape == (2,) and norms.dtype == torch.float32 and norms.device == META


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(src_ptr, dst_ptr, start, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(dst_ptr + offsets, tl.load(src_ptr + start + offsets, mask=mask), mask=mask)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter")
def test_the_checker_stops_reads_and_writes_outside_the_tensors_and_nothing_else():
    launches = []
    copy = CheckedKernel(_copy_kernel, "copy", launches)
    base = torch.arange(16.0)             # one storage: no other tensor's memory lies near
    copy[(1,)](base[8:], base[:8], 0, 6, BLOCK=16)     # lanes 6..15 masked off: not accessed
    assert base[:8].tolist() == [8, 9, 10, 11, 12, 13, 6, 7] and len(launches) == 1
    for start, n, access in [(0, 9, "read"), (-9, 2, "read")]:
        with pytest.raises(Exception, match=f"copy would {access} 1 element"):
            copy[(1,)](base[8:], base[:8], start, n, BLOCK=16)
    with pytest.raises(Exception, match="copy would write 2 element"):
        copy[(1,)](base[:6], base[12:], 0, 6, BLOCK=16)
    assert base[12:].tolist() == [12, 13, 14, 15]              # stopped before the store
    src, dst = base[8:], base[:8]
    with pytest.raises(AssertionError, match=r"copy: BLOCK=12 is not a power of two"):
        copy[(1,)](src, dst, 0, 6, BLOCK=12)
    with pytest.raises(AssertionError, match=r"copy: tensor arguments on several devices"):
        copy[(1,)](src, dst.to(META), 0, 6, BLOCK=16)
    with pytest.raises(AssertionError, match=r"PRECISION='tf32x4' is not one of"):
        check_launch_rules("dot", [src], {"PRECISION": "tf32x4"})
