"""Decode routing and cache/checkpointing helpers that must not depend on how the installed
transformers release names things (integrations/hf_compat.py).

transformers has passed a decoder layer's KV cache as `past_key_value` (4.45-4.55),
`past_key_values` (4.56-5.23) and `cache` (5.24+); the routing pre-hook must find it under any
of them, or positionally, and decode with the routing weights cached at prefill."""
import pytest
import torch

from mlan_kernels.integrations import AdaptedNorm, patch_llama
from mlan_kernels.integrations.hf_compat import cache_keyword, find_cache, new_dynamic_cache
from mlan_kernels.integrations.tiny import tiny_llama

from test_integration_llama import randomize_adapters, token_ids


def prefilled(batch=2, length=5):
    """A patched tiny LLaMA (strong router) and a DynamicCache holding a prefill of `length`."""
    model = randomize_adapters(patch_llama(tiny_llama(), placement="block"))
    cache = new_dynamic_cache(model.config)
    with torch.no_grad():
        model(token_ids(batch, length), use_cache=True, **{cache_keyword(model): cache})
    return model, cache


def run_layer_input_norm(layer, call):
    """Call `layer` through `call(layer)` with its forward replaced by "return input_layernorm
    of the hidden states" (so every keyword reaches the pre-hook, whatever the release's own
    forward accepts) -> (adapter output [B, L, D], the AdaptedNorm)."""
    def forward(hidden_states, *args, **kwargs):
        return layer.input_layernorm(hidden_states)
    layer.forward = forward
    try:
        return call(layer), layer.input_layernorm
    finally:
        del layer.forward


@pytest.mark.parametrize("how", ["cache", "past_key_values", "past_key_value", "positional"])
def test_decode_routing_is_the_prefill_routing_under_any_keyword(how):
    model, cache = prefilled()
    layer = model.model.layers[1]
    adapted = layer.input_layernorm
    assert isinstance(adapted, AdaptedNorm) and adapted.cached_routing_weights.shape == (2, 2)
    prefill_weights = adapted.cached_routing_weights.clone()
    new_token = torch.randn(2, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    if how == "positional":
        out, adapted = run_layer_input_norm(layer, lambda m: m(new_token, None, None, cache))
    else:
        out, adapted = run_layer_input_norm(layer, lambda m: m(new_token, **{how: cache}))
    assert adapted.phase == "decode"
    normed = adapted.norm(new_token)
    expected = adapted.adapter(normed, weights=prefill_weights)
    routed_by_new_token = adapted.adapter(normed)
    assert not torch.allclose(expected, routed_by_new_token)      # the test can tell them apart
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_no_cache_routes_by_the_input_and_an_empty_cache_is_a_prefill():
    model = randomize_adapters(patch_llama(tiny_llama()))
    layer = model.model.layers[0]
    x = torch.randn(2, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    out, adapted = run_layer_input_norm(layer, lambda m: m(x, past_key_values=None))
    assert adapted.phase == "full"
    torch.testing.assert_close(out, adapted.adapter(adapted.norm(x)), rtol=0, atol=0)
    empty = new_dynamic_cache(model.config)
    out, adapted = run_layer_input_norm(layer, lambda m: m(x, cache=empty))
    assert adapted.phase == "prefill"
    torch.testing.assert_close(adapted.cached_routing_weights,
                               adapted.adapter.routing_weights(adapted.norm(x)), rtol=0, atol=0)


def test_find_cache_ignores_everything_that_is_not_a_cache():
    cache = new_dynamic_cache(tiny_llama().config)
    assert find_cache((torch.zeros(1), None), {"cache_position": torch.arange(2)}) is None
    assert find_cache((torch.zeros(1),), {"x": 1, "whatever_name": cache}) is cache


def test_real_decoder_layer_decodes_with_prefill_routing():
    """The installed release's own decoder-layer forward, with the cache under the keyword
    its model forward uses: one decode step through the whole model equals recomputation."""
    model, cache = prefilled(batch=1, length=4)
    ids = token_ids(1, 4)
    next_id = torch.tensor([[7]])
    with torch.no_grad():
        step = model(next_id, use_cache=True, **{cache_keyword(model): cache}).logits[:, -1]
        full = model(torch.cat([ids, next_id], 1), use_cache=False).logits[:, -1]
    assert model.model.layers[0].input_layernorm.phase == "full"    # no cache in the recompute
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
