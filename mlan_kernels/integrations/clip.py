"""`patch_clip_vision`: MM-Adapters in every encoder block of a HuggingFace vision tower
(CLIPVisionModel, SiglipVisionModel; see families.py).

    x = x + Attn(Adapter(LN1(x)))   ("block" also: x = x + MLP(Adapter_mlp(LN2(x))))

Routing token: CLIP routes each image by its own CLS token (position 0). LaVIN routed a whole
CLIP batch by its first image (LaVIN issue #33); our op routes every image by its own token.
SigLIP has no CLS token and routes each image by the mean of its patch tokens.
AdapterConfig(compat="lavin") (build_lavin(..., compat="lavin")) switches CLIP adapters to
LaVIN's sequence-first routing (AdaptedNorm.sequence_first) to reproduce LaVIN-trained weights.
"""
from ..config import AdapterConfig
from .families import CLIP, blocks, patch


def clip_encoder_layers(model):
    """Encoder blocks of `model` in order (modules with layer_norm1, layer_norm2, self_attn, mlp)."""
    return blocks(model, CLIP)


def patch_clip_vision(model, config: AdapterConfig = None, freeze_base=True, **settings):
    """Insert an MM-Adapter (width = vision hidden size, 1024 for ViT-L/14) after LayerNorm 1 of
    every encoder block (and after LayerNorm 2 for "block"). Same contract as patch_llama;
    vision towers have no KV cache, so every forward routes each image by its own token
    (config.compat == "lavin": LaVIN's sequence-first routing, see the module docstring)."""
    return patch(model, config, freeze_base=freeze_base, component="clip", **settings)
