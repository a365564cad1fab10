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


# Tiny vision-language models: a D=32 language model (vocab 128) and a 28 px vision tower of the
# family's own kinds, special tokens at the top of the vocabulary: 127 the image placeholder,
# 125/124 the begin/end-of-image markers where the family has them, 126 the video placeholder.
IMAGE_TOKEN, IMAGE_START, IMAGE_END, VIDEO_TOKEN = 127, 125, 124, 126
_TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=128, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, head_dim=8)
_TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=28, patch_size=14)
_QWEN_VISION = dict(depth=2, num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
_MROPE = {"rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}
# model_type -> (config fields, placeholder tokens per image, image block around them)
TINY_VISION_LANGUAGE = {
    "llava": (dict(text_config={**_TINY_TEXT, "model_type": "llama"},
                   vision_config={**_TINY_VISION, "model_type": "clip_vision_model"}), 4, ()),
    "llava_next": (dict(text_config={**_TINY_TEXT, "model_type": "llama"},
                        vision_config={**_TINY_VISION, "model_type": "clip_vision_model"},
                        image_grid_pinpoints=[[28, 28]]), 10, ()),
    "llava_onevision": (dict(text_config={**_TINY_TEXT, "model_type": "qwen2"},
                             vision_config={**_TINY_VISION, "model_type": "siglip_vision_model"},
                             image_grid_pinpoints=[[28, 28]], video_token_id=VIDEO_TOKEN), 10, ()),
    "paligemma": (dict(text_config={**_TINY_TEXT, "model_type": "gemma"},
                       vision_config={**_TINY_VISION, "model_type": "siglip_vision_model", "projection_dim": 32},
                       projection_dim=32, hidden_size=32), 4, ()),
    "gemma3": (dict(text_config={**_TINY_TEXT, "model_type": "gemma3_text", "sliding_window": 16},
                    vision_config={**_TINY_VISION, "model_type": "siglip_vision_model"},
                    boi_token_id=IMAGE_START, eoi_token_id=IMAGE_END, mm_tokens_per_image=4), 4,
               (IMAGE_START, IMAGE_END)),
    "idefics3": (dict(text_config={**_TINY_TEXT, "model_type": "llama"},
                      vision_config={**_TINY_VISION, "model_type": "idefics3_vision"}, scale_factor=2), 1, ()),
    "smolvlm": (dict(text_config={**_TINY_TEXT, "model_type": "llama"},
                     vision_config={**_TINY_VISION, "model_type": "smolvlm_vision"}, scale_factor=2), 1, ()),
    "qwen2_vl": (dict(text_config={**_TINY_TEXT, **_MROPE},
                      vision_config={**_QWEN_VISION, "embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2},
                      vision_start_token_id=IMAGE_START, vision_end_token_id=IMAGE_END,
                      video_token_id=VIDEO_TOKEN), 4, (IMAGE_START, IMAGE_END)),
    "qwen2_5_vl": (dict(text_config={**_TINY_TEXT, **_MROPE},
                        vision_config={**_QWEN_VISION, "hidden_size": 32, "out_hidden_size": 32,
                                       "intermediate_size": 64, "fullatt_block_indexes": [1], "window_size": 16},
                        vision_start_token_id=IMAGE_START, vision_end_token_id=IMAGE_END,
                        video_token_id=VIDEO_TOKEN), 4, (IMAGE_START, IMAGE_END)),
}


def tiny_vision_language_model(model_type, seed=0):
    """A tiny random HF vision-language model of `model_type` (a key of TINY_VISION_LANGUAGE),
    eval mode, eager attention. ValueError when the installed transformers lacks the type."""
    import transformers
    from transformers import AutoConfig
    # AutoModelForImageTextToText from transformers 4.46 on; AutoModelForVision2Seq before
    builder = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
    if model_type not in TINY_VISION_LANGUAGE:
        raise ValueError(f"model_type must be one of {sorted(TINY_VISION_LANGUAGE)}, got {model_type!r}")
    fields = TINY_VISION_LANGUAGE[model_type][0]
    # image_seq_length: transformers 4.x expands a single placeholder per image inside the model
    # unless the prompt holds at least that many (the processor's job since)
    config = AutoConfig.for_model(model_type, image_token_id=IMAGE_TOKEN, image_token_index=IMAGE_TOKEN,
                                  image_seq_length=TINY_VISION_LANGUAGE[model_type][1], **fields)
    if not all(hasattr(getattr(config, name, None), "model_type") for name in ("text_config", "vision_config")):
        raise ValueError(f"transformers {transformers.__version__}'s {model_type} config has no "
                         f"text_config and vision_config (a later release's layout)")
    torch.manual_seed(seed)
    return builder.from_config(config, attn_implementation="eager").eval()


def tiny_image(model_type, generator=None):
    """One random image in the layout the family's vision tower reads: [3, 28, 28] pixels, or
    Qwen2-VL's [16, 96] flattened 4 px patches (a 4x4 grid, 2 frames)."""
    if model_type.startswith("qwen2"):
        return torch.randn(16, 96, generator=generator)
    return torch.randn(3, 28, 28, generator=generator)


def tiny_vision_language_inputs(model_type, samples, padding_side="left"):
    """Model inputs for a batch of samples [(text token ids, image or None)], each laid out as
    [BOS, <image block>, *text] and padded with 0 on `padding_side`: input_ids, attention_mask,
    and the family's image inputs for the samples that have one (pixel_values, image_sizes,
    image_grid_thw, token type ids)."""
    _, count, markers = TINY_VISION_LANGUAGE[model_type]
    rows = []
    for text, image in samples:
        block = [] if image is None else [*markers[:1], *[IMAGE_TOKEN] * count, *markers[1:]]
        rows.append([1, *block, *text])
    width = max(len(row) for row in rows)
    pad = [[0] * (width - len(row)) for row in rows]
    ids = torch.tensor([p + r if padding_side == "left" else r + p for p, r in zip(pad, rows)])
    inputs = {"input_ids": ids, "attention_mask": (torch.tensor(
        [[0] * len(p) + [1] * len(r) if padding_side == "left" else [1] * len(r) + [0] * len(p)
         for p, r in zip(pad, rows)]))}
    images = [image for _, image in samples if image is not None]
    if images and model_type in ("idefics3", "smolvlm"):    # one slot per sample; all-zero = no image
        blank = torch.zeros(3, 28, 28)
        inputs["pixel_values"] = torch.stack([blank if image is None else image for _, image in samples])[:, None]
    elif images and model_type.startswith("qwen2"):
        inputs["pixel_values"] = torch.cat(images)
        inputs["image_grid_thw"] = torch.tensor([[1, 4, 4]] * len(images))
        inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
    elif images and model_type in ("llava_next", "llava_onevision"):
        inputs["pixel_values"] = torch.stack([torch.stack([image, image]) for image in images])
        inputs["image_sizes"] = torch.tensor([[28, 28]] * len(images))
    elif images:
        inputs["pixel_values"] = torch.stack(images)
    if model_type == "gemma3":
        inputs["token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return inputs
