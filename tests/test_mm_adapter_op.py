"""`mm_adapter` through the op, for every backend, against the fp64 oracle.

The triton backend runs under TRITON_INTERPRET=1 on CPU (set by conftest.py), so its cases
stay small. A backend that cannot run here fails the test (no silent fallback to reference).
"""
import warnings

import pytest
import torch

from helpers import (BACKENDS, HAS_TRITON, TEMPERATURE, assert_close_to_reference,
                     assert_within_pytorch_error, compiled_backend_built,
                     explicit_weights, grads_of, make_adapter_inputs, oracle, random_grad, run_op)
from mlan_kernels import dispatch, mm_adapter
from mlan_kernels.reference import mm_adapter_reference, routing_weights

DTYPES = [pytest.param((torch.float32, None), id="fp32"),
          pytest.param((torch.float16, None), id="fp16"),
          pytest.param((torch.float16, torch.float32), id="fp16-fp32params")]
# (B, L, D, r, E, g): N = B*L never a multiple of 16; D=1024 only with few tokens.
SHAPES = [(3, 7, 64, 8, 2, 2), (3, 7, 96, 8, 1, 1), (3, 7, 96, 4, 3, 2), (2, 5, 64, 4, 3, 1),
          (1, 3, 1024, 8, 2, 2), (2, 3, 1024, 4, 2, 1)]
SHAPE_IDS = ["B{}L{}D{}r{}E{}g{}".format(*shape) for shape in SHAPES]
SMALL = (3, 7, 64, 8, 2, 2)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def assert_matches_oracle(inputs, y, grads, grad_y, **hyper):
    """y and every gradient (same dtype as its input) vs autograd of the fp64 oracle; in 16 bits
    also flash-attention's rule: our error ≤ 2 × that of the oracle run by PyTorch with every
    input in that dtype (measured on CPU: ≤ 1.0× reference and cpu, ≤ 1.53× interpreted triton;
    with E = 1 the router's gradients are exactly 0 for both)."""
    dtype = inputs["x"].dtype
    y_expected, grads_expected = oracle(inputs, grad_y, **hyper)
    assert y.dtype == inputs["x"].dtype and y.shape == inputs["x"].shape
    assert_close_to_reference(y, y_expected, dtype, "y")
    assert set(grads) == set(grads_expected)
    for name, expected in grads_expected.items():
        assert grads[name] is not None, f"no gradient for {name}"
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close_to_reference(grads[name], expected, dtype, name)
    if dtype in (torch.float16, torch.bfloat16):
        low = {name: value.to(dtype) for name, value in inputs.items()}
        y_torch, grads_torch = grads_of(lambda **kw: mm_adapter_reference(**kw, **hyper)[0], low, grad_y)
        assert_within_pytorch_error(y, y_torch, y_expected, name="y")
        for name, expected in grads_expected.items():
            assert_within_pytorch_error(grads[name], grads_torch[name], expected, name=name)


# ---------------------------------------------------------------- forward + all gradients
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_router_matches_oracle(backend, shape, dtypes, device):
    dtype, param_dtype = dtypes
    inputs = make_adapter_inputs(*shape, dtype, device, param_dtype=param_dtype)
    grad_y = random_grad(inputs["x"].shape, dtype, device)
    hyper = dict(groups=shape[5])
    y, grads = run_op(backend, inputs, grad_y, **hyper)
    assert_matches_oracle(inputs, y, grads, grad_y, **hyper)


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("shape", [SMALL, (3, 7, 96, 4, 3, 1)], ids=["E2g2", "E3g1"])
def test_explicit_weights_match_oracle(backend, shape, dtypes, device):
    dtype, param_dtype = dtypes
    inputs = make_adapter_inputs(*shape, dtype, device, param_dtype=param_dtype)
    del inputs["router_weight"], inputs["router_bias"]
    inputs["weights"] = explicit_weights(shape[0], shape[4], torch.float32, device)
    grad_y = random_grad(inputs["x"].shape, dtype, device)
    hyper = dict(groups=shape[5], scale=0.5)
    y, grads = run_op(backend, inputs, grad_y, **hyper)
    assert_matches_oracle(inputs, y, grads, grad_y, **hyper)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_x(backend, layout, device):
    B, L, D, r, E, g = SMALL
    inputs = make_adapter_inputs(*SMALL, torch.float32, device)
    if layout == "transposed":       # a [L, B, D] buffer viewed as [B, L, D]
        inputs["x"] = inputs["x"].transpose(0, 1).contiguous().transpose(0, 1)
    else:                             # every other channel of a [B, L, 2D] buffer
        wide = torch.randn(B, L, 2 * D, generator=torch.Generator().manual_seed(3)).to(device)
        inputs["x"] = wide[:, :, ::2]
    assert not inputs["x"].is_contiguous()
    grad_y = random_grad((B, L, D), torch.float32, device)
    y, grads = run_op(backend, inputs, grad_y, groups=g, dropout_p=0.2, seed=4)
    assert grads["x"].shape == (B, L, D)
    assert_matches_oracle(inputs, y, grads, grad_y, groups=g, dropout_p=0.2, seed=4)


@pytest.mark.parametrize("batch, length", [(0, 5), (2, 0)], ids=["B0", "L0"])
def test_empty_input(backend, batch, length, device):
    inputs = make_adapter_inputs(batch, length, 64, 8, 2, 2, torch.float32, device)
    y, grads = run_op(backend, inputs, groups=2, dropout_p=0.1, seed=1)
    assert y.shape == (batch, length, 64)
    assert grads["x"].shape == (batch, length, 64)
    for name, grad in grads.items():          # no tokens: every parameter gradient is zero
        assert grad is None or (grad.shape == inputs[name].shape and not grad.any()), name


# ---------------------------------------------------------------- dropout
DROPOUT = dict(groups=2, dropout_p=0.3)


def test_dropout_same_seed_is_bitwise_reproducible(backend, device):
    inputs = make_adapter_inputs(*SMALL, torch.float32, device)
    y1, grads1 = run_op(backend, inputs, seed=123, **DROPOUT)
    y2, grads2 = run_op(backend, inputs, seed=torch.tensor(123), **DROPOUT)
    assert torch.equal(y1, y2)
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name


def test_dropout_different_seeds_differ(backend, device):
    inputs = make_adapter_inputs(*SMALL, torch.float32, device)
    y1, _ = run_op(backend, inputs, seed=1, **DROPOUT)
    y2, _ = run_op(backend, inputs, seed=2, **DROPOUT)
    assert not torch.allclose(y1, y2)


def test_dropout_zero_ignores_seed(backend, device):
    inputs = make_adapter_inputs(*SMALL, torch.float32, device)
    y1, _ = run_op(backend, inputs, seed=1, groups=2, dropout_p=0.0)
    y2, _ = run_op(backend, inputs, seed=2, groups=2, dropout_p=0.0)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("dtypes", DTYPES[:2])
def test_dropout_matches_oracle_with_same_seed(backend, dtypes, device):
    """The mask is a pure function of (seed, token, unit): every backend reproduces the oracle's."""
    dtype, _ = dtypes
    inputs = make_adapter_inputs(3, 7, 96, 8, 2, 2, dtype, device)
    grad_y = random_grad(inputs["x"].shape, dtype, device)
    y, grads = run_op(backend, inputs, grad_y, seed=77, **DROPOUT)
    assert_matches_oracle(inputs, y, grads, grad_y, seed=77, **DROPOUT)


# ---------------------------------------------------------------- semantics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_identity_at_init(backend, dtype, device):
    """LaVIN zero-initializes the up-projections: the adapter is exactly the identity."""
    inputs = make_adapter_inputs(*SMALL, dtype, device, nonzero=False)
    y, _ = run_op(backend, inputs, groups=2, dropout_p=0.1, seed=5)
    assert torch.equal(y, inputs["x"])


def test_routing_is_per_sample(backend, device):
    """LaVIN issue #33: a sample's output must not depend on the other samples in the batch."""
    B, L, D, r, E, g = 4, 5, 64, 8, 2, 2
    inputs = make_adapter_inputs(B, L, D, r, E, g, torch.float32, device)
    grad_y = random_grad((B, L, D), torch.float32, device)
    y, grads = run_op(backend, inputs, grad_y, groups=g)
    weights = routing_weights(inputs["x"][:, 0], inputs["router_weight"], inputs["router_bias"],
                              TEMPERATURE)
    assert (weights - weights[:1]).abs().max() > 0.1          # samples really route differently
    # Routing every sample by sample 0's token (the LaVIN bug) would change the outputs:
    y_bug = mm_adapter(**inputs, weights=weights[:1].expand(B, E), groups=g, backend=backend)
    assert not torch.allclose(y_bug[1:], y[1:], atol=1e-3)
    for b in range(B):                       # no dropout: its mask depends on the token index
        alone = {**inputs, "x": inputs["x"][b:b + 1]}
        y_alone, grads_alone = run_op(backend, alone, grad_y[b:b + 1], groups=g)
        assert_close_to_reference(y_alone[0], y[b], name=f"y[{b}]")
        assert_close_to_reference(grads_alone["x"][0], grads["x"][b], name=f"grad x[{b}]")


def test_single_modality_fast_path(backend, device, monkeypatch):
    """With single_modality=None, samples sharing the routing token take the one-up-matrix path
    where that is decided on the host without a device sync (CPU tensors, backends without the
    routed pair); the Triton path and GPU tensors take the general path. Results match the
    general path's either way."""
    module = dispatch.get_backend(backend)
    # the entry point the op calls, and where it passes single_modality (see dispatch)
    entry, position = ("forward_routed", 13) if hasattr(module, "forward_routed") else ("forward", 10)
    seen = []
    original_forward = getattr(module, entry)

    def spy(*args, **kwargs):
        seen.append(kwargs["single_modality"] if "single_modality" in kwargs else args[position])
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(module, entry, spy)
    B, L, D, r, E, g = SMALL
    inputs = make_adapter_inputs(*SMALL, torch.float32, device, single_modality=True)
    grad_y = random_grad((B, L, D), torch.float32, device)
    y_fast, grads_fast = run_op(backend, inputs, grad_y, single_modality=None, groups=g)
    y_general, grads_general = run_op(backend, inputs, grad_y, single_modality=False, groups=g)
    detects = device.type == "cpu" and entry == "forward"
    assert seen == [detects, False]
    assert_close_to_reference(y_fast, y_general, name="y")
    for name in grads_fast:
        assert_close_to_reference(grads_fast[name], grads_general[name], name=name)
    assert_matches_oracle(inputs, y_fast, grads_fast, grad_y, groups=g)


# ---------------------------------------------------------------- torch.compile, dispatch
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    inputs = make_adapter_inputs(*SMALL, torch.float32, "cpu")

    def adapter(**kw):
        return mm_adapter(**kw, groups=2, dropout_p=0.2, seed=9, backend="reference")

    compiled = torch.compile(adapter, fullgraph=True)
    y_eager, grads_eager = grads_of(adapter, inputs)
    y_compiled, grads_compiled = grads_of(compiled, inputs)
    assert_close_to_reference(y_compiled, y_eager, name="y")
    for name in grads_eager:
        assert_close_to_reference(grads_compiled[name], grads_eager[name], name=name)
    torch._dynamo.reset()


def test_env_override_selects_backend(monkeypatch, device):
    cpu = torch.device("cpu")
    monkeypatch.delenv("MLAN_BACKEND", raising=False)
    assert dispatch.select_backend(cpu, torch.float32) == ("cpu" if compiled_backend_built("cpu") else "reference")
    monkeypatch.setenv("MLAN_BACKEND", "reference")
    assert dispatch.select_backend(device, torch.float32) == "reference"
    if HAS_TRITON:                   # on CPU via the interpreter (conftest sets TRITON_INTERPRET)
        monkeypatch.setenv("MLAN_BACKEND", "triton")
        assert dispatch.select_backend(device, torch.float32) == "triton"
    monkeypatch.setenv("MLAN_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="MLAN_BACKEND"):
        dispatch.select_backend(cpu, torch.float32)


def test_forced_cuda_on_cpu_warns_once_and_falls_back(monkeypatch):
    dispatch.reset_warnings()
    monkeypatch.setenv("MLAN_BACKEND", "cuda")
    inputs = make_adapter_inputs(*SMALL, torch.float32, "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.select_backend(torch.device("cpu"), torch.float32) == "reference"
        y1 = mm_adapter(**inputs, groups=2)
        y2 = mm_adapter(**inputs, groups=2)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert "cuda" in str(runtime[0].message)
    y_reference = mm_adapter(**inputs, groups=2, backend="reference")
    assert torch.equal(y1, y_reference) and torch.equal(y2, y_reference)
