"""What LaVIN users rely on in the assembly and its checkpoint import.

* The image tokens are neck(CLS token after every clip_every-th CLIP block), in block order; the
  CLS is read from the block outputs themselves (forward hooks), not from hidden_states; a
  16-bit vision tower's features are cast to the neck's dtype (an fp32 neck stays fp32).
* Every spelling of LaVIN's parameter names (CLIP under `backbone.visual.transformer` or
  `backbone.transformer`, DDP's `module.` prefix) loads every adapter, also with strict=False,
  where a name that fails to match would leave that adapter silently random.
"""
import pytest
import torch

from mlan_kernels.checkpoint import adapter_state_dict, load_lavin_adapters
from mlan_kernels.integrations import adapters
from mlan_kernels.integrations.clip import clip_encoder_layers
from mlan_kernels.integrations.lavin import VisualNeck

from test_integration_lavin import PIXELS, tiny_lavin


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
