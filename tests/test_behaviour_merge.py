"""Merging is invisible to the user: for any adapter scale, a model whose adapters are folded
into the projections gives the outputs of the unmerged model (LLaMA and CLIP, both placements)."""
import pytest
import torch
# Imported here, not only inside tiny_llama/tiny_clip: importing them takes seconds, and mutation
# testing (python/mutation.py) then pays it once at collection instead of once per mutant.
from transformers import CLIPVisionModel, LlamaForCausalLM  # noqa: F401

from mlan_kernels.integrations import (adapters, merge_adapters, patch_clip_vision, patch_llama,
                                       record_routing_weights, unmerge_adapters)
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama

from test_integration_llama import randomize_adapters, token_ids


def randomize_all(model):
    """randomize_adapters plus a non-zero down bias (LaVIN's init leaves b_A = 0, which would
    hide every term of the fold that multiplies it)."""
    randomize_adapters(model)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for adapter in adapters(model).values():
            adapter.down.bias.copy_(torch.randn(adapter.down.bias.shape, generator=generator))
    return model


@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_merged_llama_equals_unmerged_for_any_scale(scale, placement):
    model = randomize_all(patch_llama(tiny_llama(), scale=scale, placement=placement))
    ids = token_ids(batch=1)
    with record_routing_weights(model) as recorder:
        unmerged = model(ids).logits
    merge_adapters(model, recorder.weights)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    assert torch.equal(model(ids).logits, unmerged)


@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_merged_clip_equals_unmerged_for_any_scale(scale, placement):
    clip = randomize_all(patch_clip_vision(tiny_clip(), scale=scale, placement=placement))
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    with record_routing_weights(clip) as recorder:
        unmerged = clip(pixel_values=pixels).last_hidden_state
    merge_adapters(clip, recorder.weights)
    torch.testing.assert_close(clip(pixel_values=pixels).last_hidden_state, unmerged,
                               rtol=1e-4, atol=1e-5)


def test_routing_weights_given_in_every_documented_form_merge_alike():
    """One [E] vector, a [1, E] tensor, a [B, E] tensor of equal rows, or a {key: weights} dict
    give the same merged model."""
    vector = torch.tensor([0.3, 0.7])
    ids = token_ids(batch=1)
    outputs = []
    for form in (vector, vector[None], vector.expand(3, 2),
                 {key: vector for key in adapters(patch_llama(tiny_llama()))}):
        model = randomize_all(patch_llama(tiny_llama(), scale=2.0))
        outputs.append(merge_adapters(model, form)(ids).logits)
    for other in outputs[1:]:
        assert torch.equal(other, outputs[0])


def test_rows_differing_only_by_float32_rounding_are_one_routing_vector():
    """A saturated router gives an expert 0 in one row and one fp32 rounding step (2^-24) in
    another: still one modality's weights, accepted; rows of two modalities, even close ones,
    are refused."""
    model = randomize_all(patch_llama(tiny_llama()))
    rounding = 2.0 ** -24
    merge_adapters(model, torch.tensor([[1.0, 0.0], [1.0 - rounding, rounding]]))
    unmerge_adapters(model)
    with pytest.raises(ValueError, match="routing weights differ between samples"):
        merge_adapters(model, torch.tensor([[0.30, 0.70], [0.31, 0.69]]))


def test_merge_errors_name_what_is_wrong():
    model = randomize_all(patch_llama(tiny_llama()))
    with pytest.raises(ValueError, match=r"^weights must have 2 entries \(one per expert\), "
                                         r"got shape \[3\]$"):
        merge_adapters(model, torch.tensor([0.2, 0.3, 0.5]))
    keys = list(adapters(model))
    with pytest.raises(KeyError, match=f"no routing weights given for adapter '{keys[-1]}'"):
        merge_adapters(model, {key: torch.tensor([0.5, 0.5]) for key in keys[:-1]})


@pytest.mark.parametrize("placement", ["attn", "block"])
def test_consumers_with_their_own_bias_merge_and_unmerge_exactly(placement):
    """q/k/v (and gate/up) with non-zero biases: merged == unmerged, merging adds no trainable
    parameter, unmerging gives every original parameter back bit for bit."""
    model = randomize_all(patch_llama(tiny_llama(attention_bias=True, mlp_bias=True), scale=2.0,
                                      placement=placement))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("proj.bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    ids = token_ids(batch=1)
    with record_routing_weights(model) as recorder:
        unmerged = model(ids).logits
    merge_adapters(model, recorder.weights)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert {name for name, p in model.named_parameters() if p.requires_grad} <= trainable
    unmerge_adapters(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


class WrappedLinear(torch.nn.Linear):
    """Stands for a PEFT-wrapped projection: a Linear, but not a plain nn.Linear."""


def test_merging_into_a_wrapped_projection_names_the_adapter_and_the_projection():
    model = randomize_all(patch_llama(tiny_llama()))
    attention = model.model.layers[0].self_attn
    plain = attention.k_proj
    attention.k_proj = WrappedLinear(plain.in_features, plain.out_features, bias=False)
    with pytest.raises(TypeError, match=r"^llama\.layers\.0\.attn: can only merge into nn\.Linear, "
                                        r"self_attn\.k_proj is WrappedLinear \(merge before "
                                        r"wrapping with PEFT\)$"):
        merge_adapters(model, torch.tensor([0.5, 0.5]))


def test_the_bias_merging_adds_to_a_projection_is_not_trainable():
    """A merged model is for inference: the biases the fold gives bias-free q/k/v are frozen
    like the base weights, and unmerging removes them again."""
    model = randomize_all(patch_llama(tiny_llama()))
    merge_adapters(model, torch.tensor([0.5, 0.5]))
    added = [p for name, p in model.named_parameters() if name.endswith("proj.bias")]
    assert added and not any(p.requires_grad for p in added)
    unmerge_adapters(model)
    assert not any(name.endswith("proj.bias") for name, _ in model.named_parameters())


def test_a_failing_merge_leaves_the_model_as_it_was():
    """All or nothing: a missing key for the last adapter, a vector of the wrong length, or a
    wrapped projection in the last layer raise before any adapter is merged."""
    from mlan_kernels.integrations import is_merged
    model = randomize_all(patch_llama(tiny_llama()))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    keys = list(adapters(model))
    attention = model.model.layers[-1].self_attn
    plain = attention.v_proj
    failures = [
        (KeyError, lambda: merge_adapters(model, {key: torch.tensor([0.5, 0.5]) for key in keys[:-1]})),
        (ValueError, lambda: merge_adapters(model, {**{key: torch.tensor([0.5, 0.5]) for key in keys[:-1]},
                                                     keys[-1]: torch.tensor([0.2, 0.3, 0.5])})),
    ]
    for error, call in failures:
        with pytest.raises(error):
            call()
        assert not is_merged(model)
        assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    attention.v_proj = WrappedLinear(plain.in_features, plain.out_features, bias=False)
    attention.v_proj.load_state_dict(plain.state_dict())
    with pytest.raises(TypeError):
        merge_adapters(model, torch.tensor([0.5, 0.5]))
    assert not is_merged(model)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
