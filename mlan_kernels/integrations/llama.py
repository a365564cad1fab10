"""`patch_llama`: MM-Adapters in every decoder layer of a HuggingFace LLaMA (LaVIN's placement).

    "attn":  h = x + Attn(Adapter(RMSNorm_attn(x))),  out = h + MLP(RMSNorm_mlp(h))
    "block": additionally out = h + MLP(Adapter_mlp(RMSNorm_mlp(h)))

Works on `LlamaForCausalLM`, `LlamaModel`, and anything containing their decoder layers (a
PEFT-wrapped model, a LaVIN assembly): layers are found by their attributes, not their class.
"""
from .patching import Site, patch_component

LLAMA_SITES = {
    "attn": Site("attn", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "mlp": Site("mlp", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
}


def llama_decoder_layers(model):
    """Decoder layers of `model` in order: modules with input_layernorm, self_attn and mlp."""
    return [module for module in model.modules()
            if all(hasattr(module, name) for name in ("input_layernorm", "post_attention_layernorm",
                                                      "self_attn", "mlp"))]


def patch_llama(model, rank=8, experts=2, groups=2, scale=1.0, temperature=10.0, dropout=0.1,
                placement="attn", freeze_base=True):
    """Insert an MM-Adapter (width = hidden size D) after the pre-attention RMSNorm of every
    decoder layer ("attn"), and after the pre-MLP RMSNorm too ("block"). In place; returns model.

    Routing token: position 0 of each sample; at KV-cache decoding the weights cached at prefill
    are reused. freeze_base: only adapter parameters keep requires_grad. Patching again with the
    same hyperparameters is a no-op; with different ones it raises ValueError (unpatch first).
    Adapter parameters take the norm weight's device and dtype (so the `meta` device works).
    """
    hyperparameters = dict(rank=rank, experts=experts, groups=groups, scale=scale,
                           temperature=temperature, dropout=dropout, placement=placement)
    return patch_component(model, "llama", llama_decoder_layers(model), LLAMA_SITES,
                           hyperparameters, freeze_base, cache_aware=True)
