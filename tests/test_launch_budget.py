"""Launch budget of the MM-Adapter's Triton path (issue 19): how many device launches one
forward+backward costs, and that it never reads from the device on the host (counted by
tests/launch_counter.py). None is allowed: the dropout seed is an int64 tensor on x's device
that the kernels read. Results are checked too: against the fp64 oracle, and for
single_modality=True (sample 0 routes every sample, so its gradients differ from the oracle's
by construction) against the reference backend taking the same path. single_modality=None
routes per sample and, on the Triton path, runs the general kernels without comparing the
routing inputs (no sync), whether the samples share a modality or not.
"""
import importlib

import pytest
import torch

from helpers import (HAS_TRITON, assert_close_to_reference, explicit_weights, grads_of,
                     make_adapter_inputs, oracle, random_grad)
from launch_counter import counting, wrap_kernels
from mlan_kernels import mm_adapter

_OP_MODULE = importlib.import_module("mlan_kernels.ops.mm_adapter")
_WRAPPERS = {"mlan.mm_adapter.default": _OP_MODULE._forward_impl,
             "mlan.mm_adapter_backward.default": _OP_MODULE._backward_impl}
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="no triton")

# Device launches per forward+backward on the Triton path, measured by this test: 31-35 (fp32)
# and 43-47 (fp16: casts) before issue 19, 8 at its first step (router, weight slots, forward;
# weight slots again, passes A, B, C, router backward). Now 5 in every case: prep (weight slots
# + router), forward; passes A, B, C (C with the softmax + router backward), the slots saved.
LAUNCH_BUDGET = 5


@pytest.fixture
def counted(monkeypatch):
    """The box [counter] that every Triton kernel of the MM-Adapter backend reports to."""
    import mlan_kernels.backends.triton as backend
    from mlan_kernels.triton import mm_adapter_kernels, mm_adapter_weight_kernels
    return wrap_kernels(monkeypatch, backend, mm_adapter_kernels, mm_adapter_weight_kernels)


def _run(box, inputs, grad_y, backend, grad_routing=None, **hyper):
    """Counter, y and the gradients of <grad_y, y> (+ <grad_routing, routing weights>)."""
    leaves = {name: value.detach().requires_grad_(value.is_floating_point())
              for name, value in inputs.items()}
    names = list(leaves)
    with counting(box, _WRAPPERS) as counter:
        y, routing = mm_adapter(**leaves, backend=backend, return_routing_weights=True, **hyper)
        outputs, out_grads = (y, routing), (grad_y, grad_routing)
        used = 1 if grad_routing is None else 2
        grads = torch.autograd.grad(outputs[:used], [leaves[n] for n in names], out_grads[:used],
                                    allow_unused=True)
    return counter, y.detach(), dict(zip(names, grads))


# (single_modality, whether every sample gets sample 0's routing token) per case
ROUTINGS = {"single": (True, True), "general": (False, False),
            "none-shared": (None, True), "none-mixed": (None, False)}


@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("experts", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_launches_and_host_syncs_per_forward_backward(counted, dtype, experts, routing,
                                                      dropout_p, request):
    B, L, D, r, g = 3, 5, 64, 8, 2
    single_modality, shared = ROUTINGS[routing]
    inputs = make_adapter_inputs(B, L, D, r, experts, g, dtype, "cpu", single_modality=shared)
    grad_y = random_grad((B, L, D), dtype, "cpu")
    hyper = dict(groups=g, dropout_p=dropout_p, seed=7, single_modality=single_modality)
    counter, y, grads = _run(counted, inputs, grad_y, "triton", **hyper)

    assert not counter.host_reads, "a host read (device sync) in forward/backward"
    print(f"\n{request.node.callspec.id}: {counter.summary()}")
    assert counter.launches <= LAUNCH_BUDGET, (counter.triton, counter.aten)

    if single_modality:     # gradients follow sample 0's routing: compare with the reference path
        expected_y, expected = grads_of(
            lambda **kw: mm_adapter(**kw, backend="reference", **hyper),
            {k: v.double() for k, v in inputs.items()}, grad_y.double())
    else:                   # False and None: per sample, the oracle
        expected_y, expected = oracle(inputs, grad_y, groups=g, dropout_p=dropout_p, seed=7)
    assert_close_to_reference(y, expected_y, dtype, "y")
    for name, value in expected.items():
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close_to_reference(grads[name], value, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_single_modality_none_is_the_general_path_without_a_sync(counted, dtype, monkeypatch):
    """single_modality=None on the Triton path compares nothing (it was 2 launches and 1 host
    read): it runs the general per-sample kernels even when every sample shares the routing
    token, so y and every gradient equal single_modality=False's bit for bit."""
    import mlan_kernels.backends.triton as backend
    seen = []
    forward_routed = backend.forward_routed
    monkeypatch.setattr(backend, "forward_routed",
                        lambda *args: seen.append(args[13]) or forward_routed(*args))
    inputs = make_adapter_inputs(3, 5, 64, 8, 3, 2, dtype, "cpu", single_modality=True)
    grad_y = random_grad((3, 5, 64), dtype, "cpu")
    hyper = dict(groups=2, dropout_p=0.2, seed=5)
    counter, y, grads = _run(counted, inputs, grad_y, "triton", single_modality=None, **hyper)
    assert not counter.host_reads and counter.launches <= LAUNCH_BUDGET, counter.summary()
    _, y_general, grads_general = _run([None], inputs, grad_y, "triton", single_modality=False,
                                       **hyper)
    assert seen == [False, False]
    assert torch.equal(y, y_general)
    for name, value in grads_general.items():
        assert torch.equal(grads[name], value), name


@pytest.mark.parametrize("single_modality", [True, False, None], ids=["single", "general", "none"])
@pytest.mark.parametrize("routing", ["router", "weights"])
def test_given_weights_and_a_routing_loss_stay_in_budget(counted, routing, single_modality,
                                                        monkeypatch):
    """Explicit routing weights (copied by the prep kernel, ∂weights written by pass C) and a loss
    on the returned routing weights (its gradient summed into ∂w in pass C): same budget, no
    host read, the reference backend's results. (The argument checks are left out: for CPU
    weights they read the values, which they skip on GPU.)"""
    monkeypatch.setattr(_OP_MODULE, "validate_mm_adapter_args", lambda *args: None)
    B, L, D, r, E, g = 3, 5, 64, 8, 3, 2
    inputs = make_adapter_inputs(B, L, D, r, E, g, torch.float32, "cpu")
    if routing == "weights":
        inputs = {k: v for k, v in inputs.items() if not k.startswith("router")}
        inputs["weights"] = explicit_weights(B, E, torch.float32, "cpu")
    grad_y = random_grad((B, L, D), torch.float32, "cpu")
    grad_routing = random_grad((B, E), torch.float32, "cpu")
    hyper = dict(groups=g, dropout_p=0.2, seed=3, single_modality=single_modality)
    counter, y, grads = _run(counted, inputs, grad_y, "triton", grad_routing, **hyper)
    assert not counter.host_reads and counter.launches <= LAUNCH_BUDGET, counter.summary()
    _, expected_y, expected = _run([None], inputs, grad_y, "reference", grad_routing, **hyper)
    assert_close_to_reference(y, expected_y, torch.float32, "y")
    for name, value in expected.items():
        assert_close_to_reference(grads[name], value, torch.float32, name)


@pytest.mark.parametrize("kind,compat", [("clip_vision_model", None), ("clip_vision_model", "lavin"),
                                         ("siglip_vision_model", None)],
                         ids=["clip", "clip-lavin", "siglip"])
def test_vision_adapters_keep_none_without_a_sync(counted, kind, compat, monkeypatch):
    """The integrations that keep single_modality=None: CLIP adapters routed per image by its
    CLS token, LaVIN's sequence-first routing (image 0's token per position, given weights)
    and SigLIP's mean-patch routing (given weights). A patched tiny tower's fwd+bwd on the
    Triton path: 5 launches per adapter, no host read anywhere (the weights' value checks, CPU
    tensors only, are left out as above), the reference backend's results."""
    from mlan_kernels.integrations import adapters, patch, set_backend
    from mlan_kernels.integrations.tiny import tiny_model
    monkeypatch.setattr(_OP_MODULE, "validate_mm_adapter_args", lambda *args: None)

    def run(backend, box):
        model = tiny_model(kind)
        patch(model, rank=8, experts=2, groups=2, dropout_p=0.1, compat=compat)
        set_backend(model, backend)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():               # (LaVIN's zero up-projection: trivial gradients)
            for param in params:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        pixels = torch.randn(3, 3, 28, 28, generator=generator)
        torch.manual_seed(1)                # the adapters' dropout seeds
        with counting(box, _WRAPPERS) as counter:
            out = model(pixel_values=pixels).last_hidden_state
            grads = torch.autograd.grad(out, params, torch.ones_like(out))
        return counter, len(adapters(model)), out.detach(), grads

    counter, sites, out, grads = run("triton", counted)
    assert not counter.host_reads, counter.host_reads
    assert len(counter.triton) == LAUNCH_BUDGET * sites, counter.triton
    _, _, expected_out, expected_grads = run("reference", [None])
    assert_close_to_reference(out, expected_out, torch.float32, "out")
    for index, (got, want) in enumerate(zip(grads, expected_grads)):
        assert_close_to_reference(got, want, torch.float32, f"grad {index}")
