"""Routing as a user relies on it.

* An auxiliary loss on the routing weights that `mm_adapter(..., return_routing_weights=True)`
  returns trains the router: its gradients equal autograd through the plain softmax router
  (reference.py, fp64), alone or together with a loss on the output; on the reference, the
  default and the Triton (interpreted) backends.
* KV-cache decoding of a patched LLaMA routes every new token by the prompt's routing token: a
  decode step through the decoder layers' routing pre-hook gives the logits of recomputing the
  whole sequence without a cache.
"""
import pytest
import torch

from mlan_kernels.integrations import patch_llama
from mlan_kernels.integrations.tiny import tiny_llama
from mlan_kernels.ops.mm_adapter import mm_adapter
from mlan_kernels.reference import mm_adapter_reference

from helpers import HAS_TRITON, make_adapter_inputs, random_grad
from test_integration_llama import randomize_adapters, token_ids

HYPER = dict(scale=0.7, temperature=10.0, groups=2)


def losses_and_grads(fn, inputs, output_weight, routing_grad):
    """Gradients of output_weight·<G_y, y> + <G_w, routing weights> w.r.t. every float input."""
    leaves = {name: value.detach().clone().requires_grad_() for name, value in inputs.items()}
    y, weights = fn(**leaves)
    loss = (weights * routing_grad.to(weights.dtype)).sum()
    if output_weight:
        loss = loss + output_weight * (y * random_grad(y.shape, y.dtype, y.device, seed=7)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return weights.detach(), dict(zip(leaves, grads))


def fused(backend):
    return lambda **kw: mm_adapter(**kw, **HYPER, backend=backend, return_routing_weights=True)


def reference(**kw):
    y, _, weights = mm_adapter_reference(**kw, **HYPER)
    return y, weights


@pytest.mark.parametrize("backend", ["reference", "auto", pytest.param(
    "triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))])   # interpreted
@pytest.mark.parametrize("output_weight", [0.0, 1.0])
@pytest.mark.parametrize("given_weights", [False, True])
def test_a_loss_on_returned_routing_weights_reaches_the_router(backend, output_weight,
                                                              given_weights):
    inputs = make_adapter_inputs(3, 5, 16, 8, 2, 2, torch.float32, "cpu")
    if given_weights:                       # explicit weights: their gradient is the router's
        inputs = {name: value for name, value in inputs.items() if not name.startswith("router")}
        inputs["weights"] = torch.softmax(torch.randn(3, 2, generator=torch.Generator().manual_seed(3)), -1)
    routing_grad = torch.randn(3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights, grads = losses_and_grads(fused(backend), inputs, output_weight, routing_grad)
    inputs64 = {name: value.double() for name, value in inputs.items()}
    expected_weights, expected = losses_and_grads(reference, inputs64, output_weight, routing_grad)
    torch.testing.assert_close(weights.double(), expected_weights, rtol=1e-5, atol=1e-6)
    routed = "weights" if given_weights else "router_weight"
    assert expected[routed].abs().max() > 1e-3          # the loss does depend on the routing
    for name, grad in grads.items():
        want = torch.zeros_like(grad, dtype=torch.float64) if expected[name] is None else expected[name]
        torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("placement, layers, prompt", [
    ("attn", 2, 5), ("block", 2, 5), ("attn", 1, 5), ("attn", 2, 1)])   # one layer, one-token prompt
def test_decoding_with_a_kv_cache_equals_recomputing_the_sequence(placement, layers, prompt):
    from transformers import DynamicCache
    model = randomize_adapters(patch_llama(tiny_llama(layers=layers), placement=placement,
                                           dropout_p=0.0))
    ids = token_ids(batch=2, length=8)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits                     # [B, 8, V], no cache
        cache = DynamicCache(config=model.config)
        prefill = model(ids[:, :prompt], past_key_values=cache, use_cache=True).logits
        steps = [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
                 for t in range(prompt, ids.shape[1])]
    torch.testing.assert_close(prefill, full[:, :prompt], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, prompt:], rtol=1e-4, atol=1e-5)
