"""What LaVIN users rely on in the assembly and its checkpoint import.

* The image tokens are neck(CLS token after every clip_every-th CLIP block), in block order; the
  CLS is read from the block outputs themselves (forward hooks), not from hidden_states; a
  16-bit vision tower's features are cast to the neck's dtype (an fp32 neck stays fp32).
* Every spelling of LaVIN's parameter names (CLIP under `backbone.visual.transformer` or
  `backbone.transformer`, DDP's `module.` prefix) loads every adapter, also with strict=False,
  where a name that fails to match would leave that adapter silently random.
* Assembling the inputs: sample b's image block is the b-th image sample's tokens (any number
  of image samples); has_image may be any 0/1 form and defaults to "has an image" when pixel
  values or image tokens are given; the modality and image tokens reach the LLaMA in its own
  dtype (a 16-bit LLaMA beside the fp32 neck); pixel values with the wrong row count are
  refused by name; the neck and the attention mask are made on the device and dtype asked for.
* The neck, the modality embedding and the prefix ids live on the LLaMA's device, the first two
  in fp32 also under a 16-bit default dtype; a CLIP-layout tower of an unlisted type assembles.
* build_lavin gives each side its config (object or keywords; clip_config), freezes the base
  only when asked; an unpatched pair assembles in our layout.
"""
import re

import pytest
import torch

from mlan_kernels.integrations.checkpoint import adapter_state_dict, load_lavin_adapters
from mlan_kernels.config import AdapterConfig
from mlan_kernels.integrations import adapters, patch_clip_vision, patch_llama
from mlan_kernels.integrations.clip import clip_encoder_layers
from mlan_kernels.integrations.lavin import LavinModel, VisualNeck, build_lavin, lavin_attention_mask
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama

from helpers import default_dtype
from test_integration_lavin import PIXELS, tiny_lavin
from test_integration_llama import token_ids


@pytest.mark.parametrize("clip_every", [2, 4])
def test_image_tokens_are_the_neck_of_the_cls_after_every_kth_block(clip_every):
    model = tiny_lavin(clip_every=clip_every)               # 8 CLIP blocks -> 8 / k tokens
    blocks = clip_encoder_layers(model.clip)
    outputs = {}
    hooks = [block.register_forward_hook(
        lambda module, args, output, index=index: outputs.__setitem__(
            index, output[0] if isinstance(output, tuple) else output))
        for index, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            tokens = model.image_tokens(PIXELS)
    finally:
        for hook in hooks:
            hook.remove()
    tapped = range(clip_every - 1, len(blocks), clip_every)           # blocks k, 2k, ... (1-based)
    cls = torch.stack([outputs[index][:, 0] for index in tapped], 1)  # [N, K, C]
    assert tokens.shape == (PIXELS.shape[0], len(blocks) // clip_every, model.llama.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(tokens, model.neck(cls), rtol=1e-5, atol=1e-6)
        # and not any other token: a patch token's neck differs (the check can fail)
        assert not torch.allclose(tokens, model.neck(torch.stack(
            [outputs[index][:, -1] for index in tapped], 1)), atol=1e-3)


def lavin_names(model, clip_prefix, llama_prefix="layers"):
    """The model's adapters, neck and modality embedding under LaVIN's names."""
    state = {}
    for key, adapter in adapters(model).items():
        component, _, index, site = key.split(".")
        prefix = llama_prefix if component == "llama" else f"{clip_prefix}.resblocks"
        state.update(adapter.to_lavin_state_dict(f"{prefix}.{index}.adapter_{site}."))
    for ours, theirs in (("down", "conv_A"), ("up", "conv_B")):
        state[f"adapter_proj.{theirs}.weight"] = getattr(model.neck, ours).weight.detach().clone()
        state[f"adapter_proj.{theirs}.bias"] = getattr(model.neck, ours).bias.detach().clone()
    state["adapter_modality_embedding.weight"] = model.modality_embedding.weight.detach().clone()
    return state


@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("clip_prefix, llama_prefix", [
    ("backbone.visual.transformer", "layers"),
    ("backbone.transformer", "layers"),
    ("module.backbone.transformer", "module.layers"),
    ("module.backbone.visual.transformer", "module.layers"),
])
def test_every_lavin_name_form_loads_every_adapter(clip_prefix, llama_prefix, placement):
    source = tiny_lavin(placement=placement)
    target = tiny_lavin(placement=placement)
    with torch.no_grad():
        for tensor in adapter_state_dict(target).values():
            tensor.zero_()
    assert load_lavin_adapters(target, lavin_names(source, clip_prefix, llama_prefix),
                               strict=False) == ([], [])
    expected, loaded = adapter_state_dict(source), adapter_state_dict(target)
    assert any(name.startswith("clip.") for name in expected)
    mismatched = [name for name in expected if not torch.equal(expected[name], loaded[name])]
    assert mismatched == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_tower_feeds_the_fp32_neck_in_fp32(dtype):
    torch.manual_seed(0)
    neck = VisualNeck(16, 8, 12)                                   # fp32, as build_lavin makes it
    features = torch.randn(3, 2, 16).to(dtype)                     # a half-precision CLIP's CLS
    out = neck(features)
    assert out.dtype == torch.float32
    expected = neck.up(torch.nn.functional.silu(neck.down(features.float())))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def image_block(model, inputs, b):
    """The K image tokens of assembled sample b (ours layout: right after the modality token)."""
    return inputs["inputs_embeds"][b, 1:1 + model.image_token_count]


def test_each_image_sample_gets_its_own_image_tokens():
    """Four samples, three with images: sample b's block is image_tokens[its image index]."""
    model = tiny_lavin()
    count, dim = model.image_token_count, model.llama.config.hidden_size
    tokens = torch.randn(3, count, dim, generator=torch.Generator().manual_seed(1))
    has_image = [True, True, False, True]
    inputs = model.build_inputs(token_ids(batch=4, length=3), has_image=has_image, image_tokens=tokens)
    for b, image in ((0, 0), (1, 1), (3, 2)):
        torch.testing.assert_close(image_block(model, inputs, b), tokens[image], rtol=0, atol=0)
    assert inputs["lengths"].tolist() == [1 + count + 3] * 2 + [1 + 3] + [1 + count + 3]


@pytest.mark.parametrize("form", [[1, 0, 1], (1.0, 0.0, 1.0), torch.tensor([1, 0, 1])])
def test_has_image_in_any_0_1_form_selects_the_same_pixel_rows(form):
    """One pixel row per sample (the text sample's row ignored): a 0/1 has_image selects rows 0
    and 2, as the bool mask does (not rows 1 and 0 by integer indexing)."""
    model = tiny_lavin()
    ids = token_ids(batch=3, length=4)
    with torch.no_grad():
        want = model.build_inputs(ids, PIXELS, torch.tensor([True, False, True]))
        got = model.build_inputs(ids, PIXELS, form)
    torch.testing.assert_close(got["inputs_embeds"], want["inputs_embeds"], rtol=0, atol=0)


def test_has_image_defaults_to_whether_images_are_given():
    model = tiny_lavin()
    count, ids = model.image_token_count, token_ids(batch=2, length=3)
    tokens = torch.randn(2, count, model.llama.config.hidden_size)
    with torch.no_grad():
        lengths = [model.build_inputs(ids, **given)["lengths"].tolist() for given in
                   (dict(pixel_values=PIXELS[:2]), dict(image_tokens=tokens), {})]
    assert lengths == [[1 + count + 3] * 2, [1 + count + 3] * 2, [1 + 3] * 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_llama_gets_its_inputs_in_its_dtype(dtype):
    """The modality embedding and the neck stay fp32; the tokens they make are cast to the
    LLaMA's dtype before they join its text embeddings."""
    model = tiny_lavin()
    model.llama.to(dtype)
    with torch.no_grad():
        inputs = model.build_inputs(token_ids(batch=3, length=4), PIXELS, torch.tensor([True, False, True]))
        want = model.image_tokens(PIXELS[[0, 2]]).to(dtype)
    assert model.neck.up.weight.dtype == model.modality_embedding.weight.dtype == torch.float32
    assert inputs["inputs_embeds"].dtype == inputs["attention_mask"].dtype == dtype
    torch.testing.assert_close(image_block(model, inputs, 2), want[1], rtol=0, atol=0)
    torch.testing.assert_close(inputs["inputs_embeds"][1, 0], model.modality_embedding.weight[0].to(dtype))


@pytest.mark.parametrize("rows, message", [
    (None, "has_image marks samples with images but pixel_values is None"),
    (1, "pixel_values must have one row per sample or per image sample (3 or 2), got 1"),
    (4, "pixel_values must have one row per sample or per image sample (3 or 2), got 4")])
def test_pixel_values_must_match_the_samples_or_the_image_samples(rows, message):
    model = tiny_lavin()
    pixels = None if rows is None else torch.randn(rows, 3, 28, 28)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        model.build_inputs(token_ids(batch=3, length=4), pixels, torch.tensor([True, False, True]))


def test_the_neck_is_made_on_the_device_and_dtype_asked_for():
    neck = VisualNeck(16, 8, 12, device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in neck.parameters()} == {("meta", torch.bfloat16)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_the_attention_mask_is_made_on_the_lengths_device_in_the_dtype_asked_for(dtype):
    """meta lengths stand in for a GPU: every tensor of the mask must be made there."""
    mask = lavin_attention_mask(torch.tensor([3, 2], device="meta"), 3, dtype)
    assert (mask.device.type, mask.dtype, mask.shape) == ("meta", dtype, (2, 1, 3, 3))
    cpu = lavin_attention_mask(torch.tensor([3, 2]), 3, dtype)
    assert cpu.dtype == dtype and cpu.min() == torch.finfo(dtype).min


@pytest.mark.gpu
def test_a_gpu_model_takes_has_image_as_a_host_list():
    """has_image as a Python list with CUDA inputs: the mask, lengths and attention mask are
    made on the inputs' device, and the result is the CPU one."""
    model = tiny_lavin()
    ids = token_ids(batch=3, length=4)
    with torch.no_grad():
        want = model.build_inputs(ids, PIXELS, [1, 0, 1])
        got = model.cuda().build_inputs(ids.cuda(), PIXELS.cuda(), [1, 0, 1])
    assert got["lengths"].device.type == got["attention_mask"].device.type == "cuda"
    torch.testing.assert_close(got["inputs_embeds"].cpu(), want["inputs_embeds"], rtol=1e-4, atol=1e-5)
    assert torch.equal(got["lengths"].cpu(), want["lengths"])


@pytest.mark.parametrize("device", [None, "meta"])
def test_the_neck_modality_token_and_prefixes_live_beside_the_llama_in_fp32(device):
    """A bf16 LLaMA and CLIP on meta (standing in for a GPU), built under a bf16 default dtype:
    the neck and the modality embedding are made fp32 on the LLaMA's device (or the one asked
    for), the prefix ids there."""
    llama, clip = (model.to("meta", torch.bfloat16) for model in (tiny_llama(), tiny_clip()))
    prefixes = dict(image_prefix_ids=[1, 2], text_prefix_ids=[3])
    if device is not None:                           # LavinModel on patched models
        patch_llama(llama, compat="lavin")
        patch_clip_vision(clip, compat="lavin")
    with default_dtype(torch.bfloat16):              # as LaVIN's scripts set a 16-bit default
        model = (build_lavin(llama, clip, compat="lavin", **prefixes) if device is None
                 else LavinModel(llama, clip, device=device, **prefixes))
    made = list(model.neck.parameters()) + list(model.modality_embedding.parameters())
    assert {(p.device.type, p.dtype) for p in made} == {("meta", torch.float32)}
    assert {b.device.type for b in (model.image_prefix_ids, model.text_prefix_ids)} == {"meta"}


def test_a_vision_tower_of_an_unlisted_type_with_clips_layout_assembles():
    """A CLIP-layout tower under another model_type (as LLaVA-style forks name theirs) is read
    as CLIP: patched, and its CLS summarizes each block for the neck."""
    clip = tiny_clip()
    clip.config.model_type = "my_clip_vision"
    model = build_lavin(tiny_llama(), clip, neck_hidden=16)
    assert adapters(model.clip) and model.image_summary == "first"


@pytest.mark.parametrize("form", ["object", "keywords"])
def test_build_lavin_gives_each_side_the_config_it_was_given(form):
    """config as an AdapterConfig or as keywords reaches the LLaMA adapters; clip_config reaches
    the CLIP adapters."""
    llama_fields, clip_fields = dict(rank=4, temperature=3.0), dict(rank=2, temperature=7.0)
    if form == "object":
        model = build_lavin(tiny_llama(), tiny_clip(), AdapterConfig(**llama_fields),
                            clip_config=AdapterConfig(**clip_fields))
    else:
        model = build_lavin(tiny_llama(), tiny_clip(), clip_config=AdapterConfig(**clip_fields),
                            **llama_fields)
    for side, fields in (("llama", llama_fields), ("clip", clip_fields)):
        configs = {(a.config.rank, a.config.temperature) for a in adapters(getattr(model, side)).values()}
        assert configs == {(fields["rank"], fields["temperature"])}, side


@pytest.mark.parametrize("freeze_base", [True, False])
def test_freeze_base_false_leaves_every_parameter_trainable(freeze_base):
    model = build_lavin(tiny_llama(), tiny_clip(), freeze_base=freeze_base)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    base = [p for name, p in model.named_parameters() if ".adapter." not in name
            and not name.startswith(("neck.", "modality_embedding."))]
    assert trainable == {"llama", "clip", "neck", "modality_embedding"}      # adapters on both sides
    assert all(p.requires_grad != freeze_base for p in base)


def test_an_unpatched_pair_assembles_without_adapters():
    """LavinModel on a LLaMA and CLIP without adapters (the neck-only baseline): our layout
    (compat None), LaVIN's neck width 128 by default, and a forward runs."""
    model = LavinModel(tiny_llama(), tiny_clip())
    assert model.compat is None and not adapters(model) and model.neck.down.out_features == 128
    with torch.no_grad():
        logits = model(token_ids(batch=3, length=4), PIXELS, torch.tensor([True, False, True])).logits
    assert logits.shape == (3, 1 + model.image_token_count + 4, 97)
