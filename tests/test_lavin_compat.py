"""compat="lavin": LaVIN's weights (a checkpoint in LaVIN's training format, loaded with the
default call) on the same base give LaVIN's logits, loss and gradients, computed by the eager
rendering of LaVIN's forward in tests/lavin_reference.py (lavin/model.py 259-333, sequence-first
CLIP of clip/model.py 237, RepAdapter_Router's fp16 routing of lavin/mm_adapter.py 46).
Generation and merging work in compat mode; compat=None stays the default and differs."""
import copy

import pytest
import torch

from mlan_kernels.integrations.checkpoint import load_lavin_adapters
from mlan_kernels.integrations import adapters, record_routing_weights
from mlan_kernels.integrations.lavin import build_lavin
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama

from lavin_reference import LavinTrainables, lavin_forward, save_lavin_checkpoint

IMAGE_PREFIX = torch.tensor([11, 12])            # stand-ins for the ids of "Image: "
TEXT_PREFIX = torch.tensor([11, 12, 13, 14])     # and of "Image: N/A"
T = 12


def compat_pair(tmp_path, compat="lavin", placement="attn"):
    """(our model with LaVIN's file loaded, (reference llama, clip, LaVIN modules))."""
    llama, clip = tiny_llama(), tiny_clip()
    reference = (copy.deepcopy(llama), copy.deepcopy(clip))
    lavin = LavinTrainables(32, 2, 32, 8, neck_hidden=16, placement=placement, clip_placement=placement)
    save_lavin_checkpoint(tmp_path / "checkpoint.pth", lavin, ddp=True)
    prefixes = dict(image_prefix_ids=IMAGE_PREFIX, text_prefix_ids=TEXT_PREFIX) if compat else {}
    model = build_lavin(llama, clip, neck_hidden=16, dropout_p=0.0, placement=placement,
                        compat=compat, **prefixes).eval()
    assert load_lavin_adapters(model, tmp_path / "checkpoint.pth") == ([], [])
    return model, reference + (lavin.eval(),)


def batch(indicators, lengths, seed=0):
    """LaVIN-style batch: ids [B, T] (BOS=1 first, 0-padded), labels (0 = ignored; ours -100),
    images [B, 3, 28, 28] with zeros for text-only samples."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (len(lengths), T), generator=generator)
    ids[:, 0] = 1
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    ids = ids * mask
    lavin_labels = ids * (torch.arange(T)[None] >= 3)
    images = torch.randn(len(lengths), 3, 28, 28, generator=generator)
    images[~torch.tensor(indicators, dtype=torch.bool)] = 0
    return ids, mask.long(), lavin_labels, images, torch.tensor(indicators)


CASES = {"text first": ([0, 1, 1], [9, 12, 7]), "image first": ([1, 0, 1], [12, 5, 10]),
         "text only": ([0, 0], [12, 6]), "one image": ([1], [8]), "two images": ([1, 1], [12, 12])}


@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_equal_lavins(tmp_path, case, placement):
    model, (llama, clip, lavin) = compat_pair(tmp_path, placement=placement)
    ids, mask, lavin_labels, images, indicators = batch(*CASES[case])
    labels = lavin_labels.masked_fill(lavin_labels == 0, -100)
    with torch.no_grad():
        expected, expected_loss = lavin_forward(llama, clip, lavin, ids, lavin_labels, images,
                                                indicators, IMAGE_PREFIX, TEXT_PREFIX)
        inputs = model.build_inputs(ids, images, indicators.bool(), mask)
        out = model(ids, images, indicators.bool(), mask, labels=labels)
    assert out.logits.shape[1] <= T
    for b, length in enumerate(inputs["lengths"].tolist()):
        assert length == min(1 + len(IMAGE_PREFIX if indicators[b] else TEXT_PREFIX)
                             + 2 * int(indicators[b]) + int(mask[b].sum()), T)
        torch.testing.assert_close(out.logits[b, :length], expected[b, :length], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-6)


def test_gradients_equal_lavins(tmp_path):
    model, (llama, clip, lavin) = compat_pair(tmp_path)
    ids, mask, lavin_labels, images, indicators = batch([0, 1, 1], [9, 12, 7])
    _, loss = lavin_forward(llama, clip, lavin, ids, lavin_labels, images, indicators,
                            IMAGE_PREFIX, TEXT_PREFIX)
    loss.backward()
    labels = lavin_labels.masked_fill(lavin_labels == 0, -100)
    model(ids, images, indicators.bool(), mask, labels=labels).loss.backward()
    ours = adapters(model)
    blocks = lavin.backbone.visual.transformer.resblocks
    pairs = [(ours["llama.layers.0.attn"].router.weight.grad, lavin.layers[0].adapter_attn.expert_weights.weight.grad),
             (ours["llama.layers.1.attn"].down.weight.grad, lavin.layers[1].adapter_attn.conv_A.weight.grad[..., 0]),
             (ours["clip.layers.0.attn"].router.weight.grad, blocks[0].adapter_attn.expert_weights.weight.grad),
             (ours["clip.layers.5.attn"].up.weight.grad,
              torch.stack([blocks[5].adapter_attn.conv_B.weight.grad[..., 0],
                           blocks[5].adapter_attn.conv_D.weight.grad[..., 0]])),
             (model.neck.down.weight.grad, lavin.adapter_proj.conv_A.weight.grad),
             (model.modality_embedding.weight.grad, lavin.adapter_modality_embedding.weight.grad)]
    for ours_grad, lavin_grad in pairs:
        assert ours_grad.abs().max() > 0
        torch.testing.assert_close(ours_grad, lavin_grad, rtol=1e-4, atol=1e-6)


def test_compat_routing_is_fp16_rounded_and_sequence_first(tmp_path):
    model, _ = compat_pair(tmp_path)
    ids, mask, _, images, indicators = batch([1, 1], [12, 12])
    with torch.no_grad(), record_routing_weights(model) as recorder:
        model(ids, images, indicators.bool(), mask)
    for key, weights in recorder.weights.items():
        assert torch.equal(weights, weights.half().float()), key
    assert recorder.weights["clip.layers.0.attn"].shape == (5, 2)    # one row per CLIP position
    assert recorder.weights["llama.layers.0.attn"].shape == (2, 2)   # one row per sample


def test_default_mode_is_ours_and_differs_from_lavin(tmp_path):
    model, (llama, clip, lavin) = compat_pair(tmp_path, compat=None)
    assert model.compat is None
    ids, mask, lavin_labels, images, indicators = batch([1, 1], [8, 8])
    with torch.no_grad():
        expected, _ = lavin_forward(llama, clip, lavin, ids, lavin_labels, images, indicators,
                                    IMAGE_PREFIX, TEXT_PREFIX)
        ours = model(ids, images, indicators.bool(), mask).logits
    assert ours.shape[1] == 1 + 2 + 8 and (ours[:, :11] - expected[:, :11]).abs().max() > 1e-2


@pytest.mark.parametrize("indicators", [[1, 1], [0, 0]])
def test_generate_in_compat_mode_follows_lavins_prompt_layout(tmp_path, indicators):
    """Greedy tokens = argmax of LaVIN's forward on [BOS, prompt..., generated...] (its
    generator's layout, lavin/generator.py 48-63, without truncation); every step recomputed."""
    model, (llama, clip, lavin) = compat_pair(tmp_path)
    ids, _, _, images, flags = batch(indicators, [6, 6], seed=3)
    prompt = ids[:, :6]
    with torch.no_grad():
        tokens = model.generate(prompt, images, flags.bool(), max_new_tokens=3, use_cache=False)
        sequence = prompt
        inserted = len(IMAGE_PREFIX if indicators[0] else TEXT_PREFIX) + 2 * indicators[0]
        for step in range(3):
            width = 1 + inserted + sequence.shape[1]                 # long enough: no truncation
            padded = torch.cat([sequence, torch.zeros(2, width - sequence.shape[1], dtype=torch.long)], 1)
            expected, _ = lavin_forward(llama, clip, lavin, padded, padded, images, flags,
                                        IMAGE_PREFIX, TEXT_PREFIX)
            assert torch.equal(tokens[:, step], expected[:, width - 1].argmax(-1)), step
            sequence = torch.cat([sequence, tokens[:, step:step + 1]], 1)


@pytest.mark.parametrize("indicators", [[1, 1], [0, 0]])
def test_generate_with_cache_equals_recompute_in_compat_mode(tmp_path, indicators):
    model, _ = compat_pair(tmp_path)
    ids, _, _, images, flags = batch(indicators, [6, 6], seed=3)
    with torch.no_grad():
        cached = model.generate(ids[:, :6], images, flags.bool(), max_new_tokens=3)
        recomputed = model.generate(ids[:, :6], images, flags.bool(), max_new_tokens=3, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_merge_in_compat_mode_matches_unmerged(tmp_path):
    model, _ = compat_pair(tmp_path)
    ids, mask, _, images, indicators = batch([1, 1], [12, 9])
    with torch.no_grad():
        unmerged = model(ids, images, indicators.bool(), mask).logits
        merged = model.merge_adapters("image")(ids, images, indicators.bool(), mask).logits
        model.unmerge_adapters()
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_training_step_in_compat_mode(tmp_path):
    model, _ = compat_pair(tmp_path)
    model.train()
    ids, mask, lavin_labels, images, indicators = batch([0, 1, 1], [9, 12, 7])
    labels = lavin_labels.masked_fill(lavin_labels == 0, -100)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(ids, images, indicators.bool(), mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kwargs,message", [
    (dict(compat="LaVIN"), "compat must be one of"),
    (dict(compat="lavin", text_prefix_ids=[1]), "needs image_prefix_ids"),
    (dict(compat="lavin", image_prefix_ids=[1.5], text_prefix_ids=[1]), "must be a 1-D sequence of ints"),
    (dict(compat="lavin", image_prefix_ids=[1], text_prefix_ids=[97]), r"token ids in \[0, 97\)"),
    (dict(image_prefix_ids=[1]), 'only used with compat="lavin"'),
])
def test_compat_argument_errors_change_nothing(kwargs, message):
    llama, clip = tiny_llama(), tiny_clip()
    with pytest.raises(ValueError, match=message):
        build_lavin(llama, clip, **kwargs)
    assert not adapters(llama) and not adapters(clip)
