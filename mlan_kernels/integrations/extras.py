"""Optional extras: the attention backend choice (PEFT-wrapped parts are found by
patching.freeze_all_but_adapters).

flash-attn is never required: `preferred_attn_implementation` names "flash_attention_2" only
when the package is importable and the model runs on a CUDA device, "sdpa" otherwise. Pass it
to `from_pretrained(..., attn_implementation=...)` or `LlamaConfig(attn_implementation=...)`.
"""
import importlib.util

import torch


def flash_attn_available() -> bool:
    """Whether the `flash_attn` package is installed (checked lazily, never imported here)."""
    return importlib.util.find_spec("flash_attn") is not None


def preferred_attn_implementation(device=None) -> str:
    """"flash_attention_2" on CUDA with flash-attn installed, else "sdpa". device: where the
    model will run (default: cuda if available)."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    return "flash_attention_2" if device.type == "cuda" and flash_attn_available() else "sdpa"
