"""LaVIN assembly on tiny random LLaMA + CLIP (CPU): mask rule, labels, text-only samples skip
CLIP, mixed batch == each sample alone, freezing, generation with KV cache, per-modality merge,
and the LaVIN-7B parameter count on the meta device."""
import pytest
import torch

from mlan_kernels.integrations import AdaptedNorm
from mlan_kernels.integrations.lavin import IGNORE_INDEX, build_lavin, lavin_attention_mask
from mlan_kernels.integrations.tiny import lavin_7b_on_meta, tiny_clip, tiny_llama
from mlan_kernels.integrations.summary import count_trainable_parameters, parameter_breakdown, summary

from test_integration_llama import randomize_adapters, token_ids

PIXELS = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
HAS_IMAGE = torch.tensor([True, False, True])


def tiny_lavin(**kwargs):
    kwargs.setdefault("dropout_p", 0.0)
    model = build_lavin(tiny_llama(), tiny_clip(), neck_hidden=16, **kwargs)
    return randomize_adapters(model).eval()


def test_attention_mask_rule():
    mask = lavin_attention_mask(torch.tensor([4, 2]), 4, torch.float32)[:, 0] == 0   # [B, S, S] visible
    assert mask.shape == (2, 4, 4)
    assert mask[:, 0, 0].all() and not mask[:, 1:, 0].any()          # nobody else sees position 0
    assert mask[0, 3, 1:].all() and not mask[0, 1, 2]                   # causal
    assert not mask[1, 1, 2] and not mask[1, 3, 2] and mask[1, 3, 3]    # padding keys hidden; pad rows see themselves


def test_inputs_layout_and_labels():
    model = tiny_lavin()
    ids = token_ids(batch=3, length=5)
    attention = torch.ones_like(ids)
    attention[1, 3:] = 0
    inputs = model.build_inputs(ids, PIXELS, HAS_IMAGE, attention, labels=ids)
    image_count = model.image_token_count
    assert image_count == 2 and inputs["lengths"].tolist() == [1 + 2 + 5, 1 + 3, 1 + 2 + 5]
    labels = inputs["labels"]
    assert torch.equal(model.assemble_labels(ids, attention, HAS_IMAGE), labels)
    assert (labels[0, :3] == IGNORE_INDEX).all() and torch.equal(labels[0, 3:], ids[0])
    assert labels[1, 0] == IGNORE_INDEX and torch.equal(labels[1, 1:4], ids[1, :3])
    assert (labels[1, 4:] == IGNORE_INDEX).all()
    embeds = inputs["inputs_embeds"]
    torch.testing.assert_close(embeds[1, 0], model.modality_embedding.weight[0])
    torch.testing.assert_close(embeds[0, 0], model.modality_embedding.weight[1])


def test_text_only_batch_skips_the_vision_tower(monkeypatch):
    model = tiny_lavin()
    monkeypatch.setattr(model.clip, "forward", lambda *a, **k: pytest.fail("CLIP ran on text-only"))
    out = model(token_ids(batch=2, length=5), has_image=[False, False])
    assert out.logits.shape == (2, 6, 97)


def test_mixed_batch_equals_each_sample_alone():
    model = tiny_lavin()
    ids = token_ids(batch=3, length=6)
    attention = torch.ones_like(ids)
    attention[2, 4:] = 0
    batch = model(ids, PIXELS, HAS_IMAGE, attention).logits
    for b in range(3):
        n = int(attention[b].sum())
        alone = model(ids[b:b + 1, :n], PIXELS[b:b + 1] if HAS_IMAGE[b] else None,
                      HAS_IMAGE[b:b + 1]).logits
        torch.testing.assert_close(batch[b, :alone.shape[1]], alone[0], rtol=1e-5, atol=1e-5)


def test_only_adapters_neck_and_modality_embedding_train():
    model = tiny_lavin(dropout_p=0.1).train()
    ids = token_ids(batch=3, length=6)
    model(ids, PIXELS, HAS_IMAGE, labels=ids).loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert all(".adapter." in name or name.startswith(("neck.", "modality_embedding.")) for name in trainable)
    assert any(name.startswith("clip.") for name in trainable) and "neck.up.weight" in trainable


@pytest.mark.parametrize("has_image", [[True], [False, False]])
def test_generate_with_cache_equals_recompute(has_image):
    model = tiny_lavin()
    ids = token_ids(batch=len(has_image), length=4)
    pixels = PIXELS[:len(has_image)] if has_image[0] else None
    cached = model.generate(ids, pixels, has_image, max_new_tokens=5, use_cache=True)
    assert all(norm.phase == "decode" for norm in model.llama.modules() if isinstance(norm, AdaptedNorm))
    recomputed = model.generate(ids, pixels, has_image, max_new_tokens=5, use_cache=False)
    assert cached.shape == (len(has_image), 5) and torch.equal(cached, recomputed)


def _ragged_batch():
    ids = token_ids(batch=3, length=6)
    attention = torch.ones_like(ids)
    attention[1, 3:] = 0
    attention[2, 5:] = 0
    return ids, attention


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_batches_prompts_of_different_lengths_and_modalities(use_cache):
    model = tiny_lavin()
    ids, attention = _ragged_batch()
    batch = model.generate(ids, PIXELS, HAS_IMAGE, max_new_tokens=6, use_cache=use_cache,
                           attention_mask=attention)
    assert batch.shape == (3, 6)
    for b in range(3):
        n = int(attention[b].sum())
        alone = model.generate(ids[b:b + 1, :n], PIXELS[b:b + 1] if HAS_IMAGE[b] else None,
                               HAS_IMAGE[b:b + 1], max_new_tokens=6, use_cache=use_cache)
        assert torch.equal(batch[b], alone[0]), b


def test_generate_stops_each_row_at_eos():
    model = tiny_lavin()
    ids, attention = _ragged_batch()
    free = model.generate(ids, PIXELS, HAS_IMAGE, max_new_tokens=8, attention_mask=attention)
    eos = int(free[0, 1])
    stopped = model.generate(ids, PIXELS, HAS_IMAGE, max_new_tokens=8, attention_mask=attention,
                             eos_token_id=eos)
    ends = [row.tolist().index(eos) + 1 if eos in row.tolist() else 8 for row in free]
    assert stopped.shape == (3, max(ends))
    for b, end in enumerate(ends):
        assert torch.equal(stopped[b, :end], free[b, :end])
        assert (stopped[b, end:] == eos).all()
    with_list = model.generate(ids, PIXELS, HAS_IMAGE, max_new_tokens=8, attention_mask=attention,
                               eos_token_id=[eos, 10**6])
    assert torch.equal(with_list, stopped)
    with pytest.raises(ValueError, match="eos_token_id must be an int or a non-empty list"):
        model.generate(ids, PIXELS, HAS_IMAGE, attention_mask=attention, eos_token_id=[])


@pytest.mark.parametrize("modality", ["text", "image"])
def test_merge_per_modality(modality):
    model = tiny_lavin()
    ids = token_ids(batch=2, length=5)
    has_image = [modality == "image"] * 2
    pixels = PIXELS[:2] if modality == "image" else None
    reference = model(ids, pixels, has_image).logits
    model.merge_adapters(modality)
    torch.testing.assert_close(model(ids, pixels, has_image).logits, reference, rtol=1e-5, atol=1e-5)
    model.unmerge_adapters()
    assert torch.equal(model(ids, pixels, has_image).logits, reference)


def test_lavin_7b_parameter_count_on_meta():
    llama, clip = lavin_7b_on_meta()
    model = build_lavin(llama, clip)
    assert count_trainable_parameters(model) == 3_781_296
    rows = {label: trainable for label, trainable, _ in parameter_breakdown(model)}
    assert rows == {"llama adapters (attn)": 32 * 81_930, "clip adapters (attn)": 24 * 20_490,
                    "neck": 659_584, "modality_embedding": 8_192, "base": 0, "total": 3_781_296}
    assert "3,781,296" in summary(model)


def test_single_modality_flag_reaches_only_llama_adapters_and_keeps_results():
    from mlan_kernels.integrations import set_single_modality
    from mlan_kernels.integrations.patching import adapted_norms
    model = tiny_lavin()
    ids = token_ids(batch=2, length=5)
    expected = model(ids, PIXELS[:2], [True, True]).logits
    set_single_modality(model.llama, True)
    flags = {norm.key.split(".")[0]: norm.single_modality for norm in adapted_norms(model)}
    assert flags == {"llama": True, "clip": None}
    torch.testing.assert_close(model(ids, PIXELS[:2], [True, True]).logits, expected)
    with pytest.raises(ValueError, match="value must be True, False or None"):
        set_single_modality(model, "yes")

