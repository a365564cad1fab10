"""`patch_llama`: MM-Adapters in every decoder layer of a HuggingFace language model (LaVIN's
placement), for every decoder family in the model-type table (families.py): LLaMA 1/2/3,
Mistral, Qwen2/2.5/3, Gemma 1/2/3 (text), Phi-3.

    "attn":  h = x + Attn(Adapter(Norm_attn(x))),  out = h + MLP(Norm_mlp(h))
    "block": additionally out = h + MLP(Adapter_mlp(Norm_mlp(h)))

Works on `*ForCausalLM`, `*Model`, and anything containing their decoder layers (a PEFT-wrapped
model, a LaVIN assembly). A model type outside the table whose layers look like LLaMA's
(input_layernorm, post_attention_layernorm, self_attn, mlp; e.g. LLaVA's "llava_llama") is
patched with LLaMA's sites.
"""
from ..config import AdapterConfig
from .families import DECODER, blocks, patch


def llama_decoder_layers(model):
    """Decoder layers of `model` in order (modules with LLaMA's block attributes)."""
    return blocks(model, DECODER)


def patch_llama(model, config: AdapterConfig = None, freeze_base=True, **settings):
    """Insert an MM-Adapter (width = hidden size D) after the pre-attention norm of every
    decoder layer (config.placement "attn"), and after the pre-MLP norm too ("block"). In
    place; returns model. config: AdapterConfig, or its fields as keywords (rank=8, ...).

    Routing token: position 0 of each sample; at KV-cache decoding the weights cached at prefill
    are reused. freeze_base: only adapter parameters keep requires_grad. Patching again with the
    same config is a no-op; with a different one it raises ValueError (unpatch first).
    Adapter parameters take the norm weight's device and dtype (so the `meta` device works).
    """
    return patch(model, config, freeze_base=freeze_base, component="llama", **settings)
