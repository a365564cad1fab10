"""Merging is invisible to the user: for any adapter scale, a model whose adapters are folded
into the projections gives the outputs of the unmerged model (LLaMA and CLIP, both placements)."""
import pytest
import torch

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
