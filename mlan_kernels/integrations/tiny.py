"""Model builders from configs written in code (no downloads): tiny random models for tests and
examples, and LaVIN-7B-shaped configurations (LLaMA-7B + CLIP ViT-L/14) for parameter counts.

transformers is imported inside the functions, so `import mlan_kernels` stays light.
"""
import torch


def tiny_llama_config(hidden_size=32, layers=2, heads=4, intermediate_size=64, vocab_size=97,
                      **overrides):
    """A tiny LlamaConfig (eager attention by default: deterministic on CPU)."""
    from transformers import LlamaConfig
    values = dict(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads, intermediate_size=intermediate_size,
                  vocab_size=vocab_size, max_position_embeddings=128, attn_implementation="eager",
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_clip_config(hidden_size=32, layers=8, heads=4, intermediate_size=64, image_size=28,
                     patch_size=14, **overrides):
    """A tiny CLIPVisionConfig (8 blocks, so the LaVIN neck takes CLS after blocks 4 and 8)."""
    from transformers import CLIPVisionConfig
    values = dict(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate_size, image_size=image_size,
                  patch_size=patch_size, attn_implementation="eager")
    values.update(overrides)
    return CLIPVisionConfig(**values)


def tiny_llama(seed=0, **config):
    """A randomly initialized LlamaForCausalLM from tiny_llama_config(**config), eval mode."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**config)).eval()


def tiny_clip(seed=0, **config):
    """A randomly initialized CLIPVisionModel from tiny_clip_config(**config), eval mode."""
    from transformers import CLIPVisionModel
    torch.manual_seed(seed)
    return CLIPVisionModel(tiny_clip_config(**config)).eval()


def lavin_7b_configs():
    """(LlamaConfig of LLaMA-7B, CLIPVisionConfig of ViT-L/14 at 224 px), as LaVIN-7B uses."""
    from transformers import CLIPVisionConfig, LlamaConfig
    llama = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)
    clip = CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                            intermediate_size=4096, image_size=224, patch_size=14)
    return llama, clip


def lavin_7b_on_meta():
    """(LlamaForCausalLM, CLIPVisionModel) with LaVIN-7B shapes on the `meta` device (no memory)."""
    from transformers import CLIPVisionModel, LlamaForCausalLM
    llama_config, clip_config = lavin_7b_configs()
    with torch.device("meta"):
        return LlamaForCausalLM(llama_config), CLIPVisionModel(clip_config)


# Per-family settings for tiny_model: grouped-query attention everywhere (2 KV heads for 4
# query heads), sliding windows where the family has them, tied embeddings where it ties.
TINY_FAMILY_SETTINGS = {
    "llama": {}, "qwen2": {}, "phi3": {"pad_token_id": 0},
    "mistral": {"sliding_window": 16},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 16, "query_pre_attn_scalar": 8},
    "gemma3_text": {"head_dim": 8, "sliding_window": 16, "query_pre_attn_scalar": 8},
}
TINY_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")


def tiny_model(model_type, seed=0, **overrides):
    """A tiny random model of a family in the model-type table (families.py), eval mode, eager
    attention: `*ForCausalLM` for decoders (D=32, 2 layers, 4 heads, 2 KV heads, vocab 97),
    the vision model for "clip_vision_model" / "siglip_vision_model" (D=32, 2 blocks, 28 px,
    14 px patches). ValueError when the installed transformers lacks that model type."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    if model_type in TINY_VISION_TYPES:
        values = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, image_size=28, patch_size=14)
    else:
        values = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, vocab_size=97,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                      **TINY_FAMILY_SETTINGS.get(model_type, {}))
    values.update(overrides)
    config = AutoConfig.for_model(model_type, **values)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    builder = AutoModel if model_type in TINY_VISION_TYPES else AutoModelForCausalLM
    return builder.from_config(config, attn_implementation="eager").eval()
