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
