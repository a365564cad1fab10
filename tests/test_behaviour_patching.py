"""Patching as a user relies on it (integrations/patching.py).

* An adapter's input must be [B, L, D]; a KV-cache decode step without the routing weights of a
  prefill of the same batch is refused, naming the adapter, what was cached and the batch.
* A SigLIP tower's adapters route each image by the mean of its tokens: the output does not
  depend on the order of the positions, and an image alone == inside a batch.
* set_single_modality reaches only the component asked for (all with None), and True routes
  every sample by sample 0's token; set_backend's choice reaches the op.
* unpatch(model, component) removes that component only, and a fully unpatched model carries
  nothing of the patch (its attributes are those it had before).
* record_routing_weights reports only forwards run inside it, records nothing after it, and
  lets an exception raised inside it through.
"""
import pytest
import torch

from mlan_kernels.integrations import (adapters, patch_llama, record_routing_weights,
                                       reset_routing_cache, set_backend, set_single_modality,
                                       unpatch)
from mlan_kernels.integrations.hf_compat import cache_keyword
from mlan_kernels.integrations.patching import AdaptedNorm, adapted_norms, patch_state
from mlan_kernels.integrations.tiny import tiny_llama, tiny_model

from test_integration_lavin import PIXELS, tiny_lavin
from test_integration_llama import randomize_adapters, token_ids


def first_norm(model) -> AdaptedNorm:
    return adapted_norms(model)[0]


def test_an_input_that_is_not_batch_length_dim_is_refused_naming_the_adapter():
    model = patch_llama(tiny_llama())
    with pytest.raises(ValueError, match=r"^llama\.layers\.0\.attn: adapter input must be "
                                         r"\[B, L, D\], got \[4, 32\]$"):
        first_norm(model)(torch.randn(4, 32))


def prefill(model, ids):
    """A KV cache (as the keyword model.forward takes it) holding the prefill of `ids`."""
    from transformers import DynamicCache
    cache = {cache_keyword(model): DynamicCache(config=model.config)}
    with torch.no_grad():
        model(ids, **cache, use_cache=True)
    return cache


def test_decoding_another_batch_than_the_prefilled_one_is_refused():
    model = randomize_adapters(patch_llama(tiny_llama(), dropout_p=0.0))
    cache = prefill(model, token_ids(batch=2, length=4))
    step = token_ids(batch=3, length=1, seed=1)
    with pytest.raises(RuntimeError, match=(
            r"^llama\.layers\.0\.attn: decoding with a KV cache needs the routing weights cached "
            r"at prefill for the same batch \(got \[2, 2\] for batch 3\); decode the batch that "
            r"was prefilled$")), torch.no_grad():
        model(step, **cache, use_cache=True)


def test_decoding_after_the_routing_cache_was_reset_is_refused():
    model = randomize_adapters(patch_llama(tiny_llama(), dropout_p=0.0))
    cache = prefill(model, token_ids(batch=2, length=4))
    reset_routing_cache(model)
    with pytest.raises(RuntimeError, match=r"^llama\.layers\.0\.attn: .* \(got None for batch 2\)"), \
            torch.no_grad():
        model(token_ids(batch=2, length=1, seed=1), **cache, use_cache=True)


def test_decoding_with_a_cache_filled_before_patching_is_refused():
    model = tiny_llama()
    cache = prefill(model, token_ids(batch=2, length=4))     # the base model's prompt KV
    patch_llama(model)
    with pytest.raises(RuntimeError, match=r"^llama\.layers\.0\.attn: .* \(got None for batch 2\)"), \
            torch.no_grad():
        model(token_ids(batch=2, length=1, seed=1), **cache, use_cache=True)


def siglip_norm(placement="attn"):
    from mlan_kernels.integrations import patch_clip_vision
    tower = randomize_adapters(patch_clip_vision(tiny_model("siglip_vision_model"),
                                                 dropout_p=0.0, placement=placement))
    return first_norm(tower)


def test_siglip_adapters_route_each_image_by_the_mean_of_its_tokens():
    norm = siglip_norm()
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    norm.double()
    order = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad(), record_routing_weights(norm) as recorder:
        out = norm(x)
    with torch.no_grad():
        normed = norm.norm(x)
        expected = norm.adapter.routing_weights(normed.mean(1, keepdim=True))     # [B, E]
        torch.testing.assert_close(recorder.weights[norm.key], expected, rtol=0, atol=1e-12)
        assert (expected.max(-1).values < 0.99).all() and not torch.allclose(expected[0], expected[1])
        # the same weights, whatever the order of the positions, and per image
        torch.testing.assert_close(norm(x[:, order]), out[:, order], rtol=0, atol=1e-12)
        for b in range(x.shape[0]):
            torch.testing.assert_close(norm(x[b:b + 1]), out[b:b + 1], rtol=0, atol=1e-12)
        # and they are what the op is given: not the first token's routing
        torch.testing.assert_close(out, norm.adapter(normed, weights=expected), rtol=0, atol=1e-12)
        assert not torch.allclose(out, norm.adapter(normed), atol=1e-6)


def test_siglip_adapters_take_an_empty_sequence():
    norm = siglip_norm()
    with torch.no_grad():
        out = norm(torch.randn(2, 0, 32))
    assert out.shape == (2, 0, 32)


def test_single_modality_goes_to_the_component_asked_for():
    model = tiny_lavin()
    flags = lambda: {norm.key.split(".")[0]: norm.single_modality for norm in adapted_norms(model)}
    set_single_modality(model, True)                       # default component: llama
    assert flags() == {"llama": True, "clip": None}
    set_single_modality(model, False, component="clip")
    assert flags() == {"llama": True, "clip": False}
    set_single_modality(model, None, component=None)       # every adapter
    assert flags() == {"llama": None, "clip": None}


def test_single_modality_true_routes_every_sample_by_sample_zero():
    model = randomize_adapters(patch_llama(tiny_llama(), dropout_p=0.0))
    norm = first_norm(model)
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        normed = norm.norm(x)
        own = norm.adapter.routing_weights(normed)
        assert not torch.allclose(own[0], own[1], atol=1e-3)
        set_single_modality(model, True)
        torch.testing.assert_close(norm(x), norm.adapter(normed, weights=own[:1].expand(3, -1)))
        set_single_modality(model, False)
        torch.testing.assert_close(norm(x), norm.adapter(normed, weights=own))


def test_the_backend_set_on_the_model_reaches_the_op():
    model = patch_llama(tiny_llama())
    set_backend(model, "no-such-backend")
    with pytest.raises(ValueError, match="backend must be one of .* got 'no-such-backend'"):
        model(token_ids(batch=1, length=3), use_cache=False)


@pytest.mark.parametrize("component, kept", [("clip", "llama"), ("llama", "clip")])
def test_unpatching_one_component_keeps_the_other(component, kept):
    model = tiny_lavin()
    before = {key: adapter for key, adapter in adapters(model).items() if key.startswith(kept)}
    unpatch(model, component)
    assert patch_state(getattr(model, component), component) is None
    assert patch_state(getattr(model, kept), kept) is not None
    assert adapters(model) == before
    assert not any(isinstance(module, AdaptedNorm) for module in getattr(model, component).modules())


def test_a_fully_unpatched_model_keeps_no_trace_of_the_patch():
    model = tiny_llama()
    attributes = set(vars(model))
    patch_llama(model)
    unpatch(model)
    assert set(vars(model)) == attributes
    assert patch_state(model) is None


def test_recording_reports_only_forwards_run_inside_it():
    model = randomize_adapters(patch_llama(tiny_llama(), dropout_p=0.0))
    prefill(model, token_ids(batch=2, length=4))           # caches routing weights at prefill
    with record_routing_weights(model) as recorder:
        pass
    assert recorder.weights == {}


def test_recording_stops_when_the_block_ends():
    model = randomize_adapters(patch_llama(tiny_llama(), dropout_p=0.0))
    with torch.no_grad():
        with record_routing_weights(model) as recorder:
            model(token_ids(batch=2, length=4), use_cache=False)
        assert set(recorder.weights) == set(adapters(model))
        model(token_ids(batch=2, length=4, seed=3), use_cache=False)
    assert all(norm.record_routing is False and norm.cached_routing_weights is recorder.weights[norm.key]
               for norm in adapted_norms(model))


def test_an_error_inside_the_recording_block_is_raised():
    model = patch_llama(tiny_llama())
    with pytest.raises(KeyError, match="raised inside"), record_routing_weights(model):
        raise KeyError("raised inside")


def test_patch_state_lists_the_patched_components():
    model = tiny_lavin()
    assert set(patch_state(model)) == {"llama", "clip"}
    assert patch_state(model, "llama")["config"] == patch_state(model.llama)["llama"]["config"]
    assert patch_state(model, "clip")["info"] == {
        "model_class": "CLIPVisionModel", "model_type": "clip_vision_model", "hidden_size": 32,
        "num_layers": 8}
    unpatch(model)
    assert patch_state(model) is None and patch_state(model, "llama") is None


def test_merged_adapters_are_still_the_models_adapters():
    from mlan_kernels.integrations import merge_adapters, unmerge_adapters
    model = randomize_adapters(patch_llama(tiny_llama(), placement="block", dropout_p=0.0))
    before = adapters(model)
    merge_adapters(model, torch.tensor([0.25, 0.75]))
    assert not any(isinstance(module, AdaptedNorm) for module in model.modules())
    assert adapters(model) == before                 # e.g. for save_adapters while merged
    set_backend(model, "reference")
    unmerge_adapters(model)
    assert adapters(model) == before
    assert {norm.backend for norm in adapted_norms(model)} == {"reference"}


def test_a_model_without_layers_is_refused():
    with pytest.raises(ValueError, match=r"^found no llama layers to patch in LlamaForCausalLM$"):
        patch_llama(tiny_llama(layers=0))


def test_adapters_take_the_device_and_dtype_of_the_norm_they_follow():
    model = patch_llama(tiny_llama().double())
    assert {p.dtype for adapter in adapters(model).values() for p in adapter.parameters()} == {torch.float64}
    with torch.device("meta"):
        meta = tiny_llama_on_meta()
    patch_llama(meta)
    assert {p.device.type for adapter in adapters(meta).values() for p in adapter.parameters()} == {"meta"}


def tiny_llama_on_meta():
    from transformers import LlamaForCausalLM
    from mlan_kernels.integrations.tiny import tiny_llama_config
    return LlamaForCausalLM(tiny_llama_config())


def test_norms_without_parameters_are_wrapped_too():
    """A non-parametric LayerNorm (as OLMo's): the adapter gets the default device and dtype."""
    model = tiny_llama()
    for layer in model.model.layers:
        layer.input_layernorm = torch.nn.LayerNorm(32, elementwise_affine=False)
    expected = model(token_ids(batch=2, length=4), use_cache=False).logits
    patch_llama(model)
    assert {p.dtype for adapter in adapters(model).values() for p in adapter.parameters()} == {torch.float32}
    torch.testing.assert_close(model(token_ids(batch=2, length=4), use_cache=False).logits, expected)


class Wrapper(torch.nn.Module):
    """A multimodal wrapper whose own config has no hidden_size (it is in a sub-config)."""

    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig
        self.config = PretrainedConfig()
        self.language_model = tiny_llama()


def test_a_wrapper_is_patched_with_the_config_that_has_the_hidden_size():
    wrapper = patch_llama(Wrapper())
    assert not hasattr(wrapper.config, "hidden_size")
    assert {adapter.dim for adapter in adapters(wrapper).values()} == {32}
    assert len(adapters(wrapper)) == 2
    container = patch_llama(torch.nn.ModuleDict({"lm": tiny_llama()}))   # no config of its own
    assert len(adapters(container)) == 2


def test_a_model_without_a_config_is_refused():
    with pytest.raises(ValueError, match=r"^cannot find a config with hidden_size in Linear$"):
        patch_llama(torch.nn.Linear(2, 2))
