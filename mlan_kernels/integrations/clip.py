"""`patch_clip_vision`: MM-Adapters in every encoder block of a HuggingFace CLIP vision tower.

    x = x + Attn(Adapter(LN1(x)))   ("block" also: x = x + MLP(Adapter_mlp(LN2(x))))

Routing token: the CLS token (position 0) of each image, per image (LaVIN routed a whole CLIP
batch by its first image, LaVIN issue #33; our op routes every row by its own x[b, 0]).
LavinModel(compat="lavin") switches the adapters to LaVIN's sequence-first routing
(AdaptedNorm.sequence_first) to reproduce LaVIN-trained weights.
"""
from .patching import Site, patch_component

CLIP_SITES = {
    "attn": Site("attn", "layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "mlp": Site("mlp", "layer_norm2", ("mlp.fc1",)),
}


def clip_encoder_layers(model):
    """Encoder blocks of `model` in order: modules with layer_norm1, layer_norm2, self_attn, mlp."""
    return [module for module in model.modules()
            if all(hasattr(module, name) for name in ("layer_norm1", "layer_norm2", "self_attn", "mlp"))]


def patch_clip_vision(model, rank=8, experts=2, groups=2, scale=1.0, temperature=10.0, dropout=0.1,
                      placement="attn", freeze_base=True):
    """Insert an MM-Adapter (width = vision hidden size, 1024 for ViT-L/14) after LayerNorm 1 of
    every CLIP encoder block (and after LayerNorm 2 for "block"). Same contract as patch_llama;
    CLIP has no KV cache, so every forward routes by each image's CLS token."""
    hyperparameters = dict(rank=rank, experts=experts, groups=groups, scale=scale,
                           temperature=temperature, dropout=dropout, placement=placement)
    return patch_component(model, "clip", clip_encoder_layers(model), CLIP_SITES,
                           hyperparameters, freeze_base, cache_aware=False)
