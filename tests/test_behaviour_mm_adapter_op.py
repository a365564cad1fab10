"""mm_adapter (ops/mm_adapter.py) as a user relies on it, beyond matching the oracle per sample:

* single_modality=True routes every sample by sample 0 also when the samples differ (every
  backend, Triton interpreted): y and every gradient are those of the oracle fed sample 0's
  routing (the router and x[0, 0], or weights[0], receive the whole batch's routing
  gradient), also for one-token sequences;
* the keyword defaults are the documented ones (scale 1, temperature 10, no dropout, 1 group);
* the backward op returns each gradient in its input's dtype (what its fake promises
  torch.compile), and the requested backend is the one that runs, forward and backward;
* the dropout seed reaches the op as an int64 tensor on x's device, whatever form it was given
  in; a drawn seed is on x's device and spread over [0, 2³¹ − 1);
* single_modality must be None, True or False;
* returned routing weights are fp32, uniform (1/E) for an empty sequence; samples route apart
  (batch 2, equal tokens with different given weights) unless single_modality=True; the op on
  an empty input returns what its fake promises;
* the reference backend makes every tensor it needs (the dropout mask) on x's device, and each
  CPU backend returns y, h and every gradient in the contract's dtypes (below the op's casts).
"""
import importlib
import re

import pytest
import torch

from helpers import BACKENDS, grads_of, make_adapter_inputs, random_grad, spy_on_backends
from mlan_kernels import dispatch, mm_adapter
from mlan_kernels.backends import plain_torch
from mlan_kernels.functional import routing_weights
from mlan_kernels.ops.mm_adapter import new_dropout_seed
from mlan_kernels.reference import mm_adapter_reference

op_module = importlib.import_module("mlan_kernels.ops.mm_adapter")
CPU_BACKENDS = [b for b in BACKENDS if (b.values[0] if hasattr(b, "values") else b) in ("reference", "cpu")]
TRITON = [b for b in BACKENDS if (b.values[0] if hasattr(b, "values") else b) == "triton"]   # interpreted


def routed_by_sample_0(x, router_weight=None, router_bias=None, weights=None, **rest):
    """The oracle with every sample routed by sample 0 (autograd sums the rows' routing
    gradients into x[0, 0] and the router, or into weights[0])."""
    batch = x.shape[0]
    if weights is None:
        weights = routing_weights(x[:1, 0], router_weight, router_bias, rest["temperature"])
    return mm_adapter_reference(x, weights=weights[:1].expand(batch, -1), **rest)[0]


@pytest.mark.parametrize("backend", CPU_BACKENDS + TRITON)
@pytest.mark.parametrize("routing", ["router", "weights"])
@pytest.mark.parametrize("batch, length", [(3, 4), (3, 1), (2, 4)])
def test_single_modality_true_routes_every_sample_by_sample_0(backend, routing, batch, length):
    inputs = make_adapter_inputs(batch, length, 16, 4, 3, 1, torch.float32, torch.device("cpu"))
    if routing == "weights":
        inputs["weights"] = torch.softmax(torch.randn(batch, 3, generator=torch.Generator().manual_seed(5)), -1)
        del inputs["router_weight"], inputs["router_bias"]
    hyper = dict(scale=0.7, temperature=5.0, groups=1)
    grad_y = random_grad(inputs["x"].shape, torch.float32, torch.device("cpu"))
    y, grads = grads_of(lambda **kw: mm_adapter(**kw, single_modality=True, backend=backend, **hyper),
                        inputs, grad_y)
    inputs64 = {name: value.double() for name, value in inputs.items()}
    want_y, want = grads_of(lambda **kw: routed_by_sample_0(**kw, **hyper), inputs64, grad_y.double())
    per_sample = mm_adapter(**inputs, single_modality=False, backend=backend, **hyper)
    assert not torch.allclose(per_sample, y, atol=1e-3)           # the samples do route apart
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), want[name], rtol=1e-5, atol=1e-5, msg=name)
    if routing == "weights":
        assert not grads["weights"][1:].any()


def test_the_keyword_defaults_are_the_documented_ones():
    """mm_adapter(x, W_A, b_A, M, b_U, W_R, b_R) = scale 1, temperature 10, no dropout, groups 1."""
    inputs = make_adapter_inputs(2, 3, 16, 4, 2, 1, torch.float32, torch.device("cpu"))
    expected = mm_adapter_reference(**inputs, scale=1.0, temperature=10.0, dropout_p=0.0, groups=1)[0]
    torch.testing.assert_close(mm_adapter(*inputs.values()), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("routing", ["router", "weights"])
def test_the_backward_op_returns_each_gradient_in_its_inputs_dtype(routing):
    """All inputs bf16 (the compute is fp32): every gradient comes back bf16, as the op's fake
    (what torch.compile plans with) says."""
    inputs = make_adapter_inputs(2, 3, 16, 4, 2, 1, torch.bfloat16, torch.device("cpu"))
    weights = None
    if routing == "weights":
        weights = torch.full((2, 2), 0.5, dtype=torch.bfloat16)
        inputs["router_weight"] = inputs["router_bias"] = None
    args = [inputs["x"], inputs["down_weight"], inputs["down_bias"], inputs["up_weight"],
            inputs["up_bias"], inputs["router_weight"], inputs["router_bias"], weights]
    y, h, rw, saved = torch.ops.mlan.mm_adapter(*args, 1.0, 10.0, 0.0, None, 1, None, "reference")
    grads = torch.ops.mlan.mm_adapter_backward(
        torch.ones_like(y), torch.ones_like(rw), inputs["x"], h, rw, saved, *args[1:6], weights,
        1.0, 10.0, 0.0, None, 1, False, "reference")
    *token_grads, routing_grads = grads
    assert [g.dtype for g in token_grads] == [torch.bfloat16] * 5
    assert [g.dtype for g in routing_grads] == [torch.bfloat16] * (1 if weights is not None else 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_requested_backend_runs_forward_and_backward(backend, monkeypatch):
    calls = spy_on_backends(monkeypatch, "mm_adapter", ("reference", "cpu"))
    inputs = make_adapter_inputs(2, 3, 16, 4, 2, 1, torch.float32, torch.device("cpu"))
    grads_of(lambda **kw: mm_adapter(**kw, backend=backend), inputs)
    assert calls == [(backend, "forward"), (backend, "backward")]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_seed_reaches_the_op_as_int64_on_xs_device(device, monkeypatch):
    """An int, an int32 tensor, a CPU tensor or None (drawn): the op gets an int64 scalar
    tensor on x's device ("meta" stands in for a GPU). Without dropout it gets None."""
    seen = []
    apply = op_module.MMAdapterFunction.apply
    monkeypatch.setattr(op_module.MMAdapterFunction, "apply",
                        lambda *args: seen.append(args[11]) or apply(*args))
    inputs = make_adapter_inputs(2, 3, 16, 4, 2, 1, torch.float32, torch.device(device))
    for seed in (7, torch.tensor(7, dtype=torch.int32), torch.tensor(7), None):
        mm_adapter(**inputs, dropout_p=0.25, seed=seed)
        got = seen[-1]
        assert (got.dtype, got.device.type, got.shape) == (torch.int64, device, ()), seed
        if device == "cpu" and seed is not None:
            assert int(got) == 7
    mm_adapter(**inputs, dropout_p=0.0, seed=7)
    assert seen[-1] is None


def test_drawn_seeds_are_on_the_device_and_spread_over_the_int32_range():
    assert new_dropout_seed(torch.device("meta")).device.type == "meta"
    torch.manual_seed(0)
    seeds = torch.stack([new_dropout_seed() for _ in range(2000)])
    assert seeds.dtype == torch.int64 and seeds.shape == (2000,)
    assert int(seeds.min()) >= 0 and int(seeds.max()) < 2**31 - 1
    assert int(seeds.max()) > 2**30 and len(set(seeds.tolist())) > 1990


def test_single_modality_must_be_none_true_or_false():
    inputs = make_adapter_inputs(2, 3, 16, 4, 2, 1, torch.float32, torch.device("cpu"))
    with pytest.raises(TypeError, match="^" + re.escape("single_modality must be None, True or False, got 'yes'") + "$"):
        mm_adapter(**inputs, single_modality="yes")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_returned_routing_weights_are_fp32_and_uniform_without_a_routing_token(backend):
    """return_routing_weights=True: [B, E] fp32 for 16-bit x and 16-bit given weights (the
    weights' values, not rounded further); an empty sequence (no routing token) routes
    uniformly, 1/E per expert, and leaves y = x."""
    inputs = make_adapter_inputs(2, 3, 16, 4, 3, 1, torch.float16, torch.device("cpu"))
    given = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]], dtype=torch.float16)
    _, rw = mm_adapter(**{**inputs, "router_weight": None, "router_bias": None}, weights=given,
                       backend=backend, return_routing_weights=True)
    assert rw.dtype == torch.float32 and torch.equal(rw, given.float())
    empty = {**inputs, "x": inputs["x"][:, :0]}
    y, rw = mm_adapter(**empty, backend=backend, return_routing_weights=True)
    assert y.shape == (2, 0, 16) and rw.dtype == torch.float32
    assert torch.equal(rw, torch.full((2, 3), 1 / 3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("single_modality", [None, False])
def test_samples_route_apart_unless_promised_otherwise(backend, single_modality):
    """single_modality None or False: every sample is mixed by its own routing, also for a
    batch of 2, and when given weights differ while the routing tokens are equal (the fast path
    may only be taken when the weights rows agree)."""
    inputs = make_adapter_inputs(2, 3, 16, 4, 3, 1, torch.float32, torch.device("cpu"), single_modality=True)
    weights = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    for given in (weights, None):                        # equal routing tokens, then two
        if given is None:
            inputs["x"][1, 0] += 1.0
        y = mm_adapter(**inputs, weights=given, single_modality=single_modality, backend=backend)
        expected = mm_adapter_reference(**inputs, weights=given)[0]
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_the_op_on_an_empty_input_returns_what_its_fake_promises(shape):
    """No tokens: y = x, h [B, L, r] in the compute dtype (the fake's shapes and dtypes)."""
    inputs = make_adapter_inputs(2, 3, 16, 4, 3, 1, torch.float16, torch.device("cpu"))
    x = inputs["x"][:shape[0], :shape[1]]
    args = (x, inputs["down_weight"], inputs["down_bias"], inputs["up_weight"], inputs["up_bias"],
            inputs["router_weight"], inputs["router_bias"], None, 1.0, 10.0, 0.0, None, 1, None, "reference")
    y, h, rw, _ = torch.ops.mlan.mm_adapter(*args)
    assert torch.equal(y, x) and (h.shape, h.dtype) == ((*shape, 4), torch.float32)
    assert (rw.shape, rw.dtype) == ((shape[0], 3), torch.float32)
    torch.library.opcheck(torch.ops.mlan.mm_adapter.default, args)


@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_the_reference_backend_makes_its_tensors_on_xs_device(dropout_p):
    """Forward and backward of the plain-torch backend on meta tensors (standing in for a GPU):
    a mask made on the CPU would fail the product with a device tensor."""
    batch, length, dim, rank, experts, groups = 2, 3, 8, 4, 2, 2
    made = make_adapter_inputs(batch, length, dim, rank, experts, groups, torch.float32,
                               torch.device("cpu"))
    x, down_w, down_b, up_w, up_b = (made[name].to("meta") for name in
                                     ("x", "down_weight", "down_bias", "up_weight", "up_bias"))
    weights = torch.full((batch, experts), 0.5, device="meta")
    seed = torch.tensor(3, dtype=torch.int64, device="meta")
    y, h = plain_torch.forward(x, down_w, down_b, up_w, up_b, weights, 0.5, dropout_p, seed,
                               groups, False)
    grads = plain_torch.backward(torch.ones_like(x), x, h, weights, down_w, down_b, up_w, up_b,
                                 0.5, dropout_p, seed, groups)
    assert (y.shape, h.shape) == ((batch, length, dim), (batch, length, rank))
    inputs = (x, down_w, down_b, up_w, up_b, weights)
    assert [(t.device.type, t.shape) for t in (y, h) + tuple(grads)] == (
        [("meta", y.shape), ("meta", h.shape)] + [("meta", t.shape) for t in inputs])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_each_backend_returns_outputs_and_gradients_in_their_inputs_dtypes(backend, dtype):
    """The backend contract itself (dispatch.py), below the op's casts: y in x's dtype, h in the
    compute dtype (fp32), each gradient in its input's dtype (fp32 routing weights)."""
    module = dispatch.get_backend(backend)
    inputs = make_adapter_inputs(2, 3, 16, 4, 2, 2, dtype, torch.device("cpu"))
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    params = [inputs[name] for name in ("down_weight", "down_bias", "up_weight", "up_bias")]
    y, h = module.forward(inputs["x"], *params, weights, 0.5, 0.0, None, 2, False)
    grads = module.backward(torch.ones_like(y), inputs["x"], h, weights, *params, 0.5, 0.0, None, 2)
    assert (y.dtype, h.dtype) == (dtype, torch.float32)
    assert [g.dtype for g in grads] == [dtype] * 5 + [torch.float32]
