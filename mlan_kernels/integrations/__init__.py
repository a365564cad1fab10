"""HuggingFace integrations: MM-Adapters in LLaMA / CLIP, merging, the LaVIN assembly.

Layering: this package imports `mlan_kernels.config` / `modules` / `ops` / `functional`, never the reverse.
"""
from ..requirements import require_extra

require_extra("hf", __name__)

from ..config import AdapterConfig
from .clip import patch_clip_vision
from .families import MODEL_TYPES, VISION_LANGUAGE_TYPES, patch, unpatch
from .hf_compat import enable_gradient_checkpointing
from .llama import patch_llama
from .merge import is_merged, merge_adapters, unmerge_adapters
from .patching import (AdaptedNorm, adapters, freeze_all_but_adapters,
                       patch_state, record_routing_weights, reset_routing_cache, set_backend,
                       set_single_modality, unpatched)
from .routing import routing_modality
from .vlm import modality_routing_weights

__all__ = ["MODEL_TYPES", "VISION_LANGUAGE_TYPES", "patch", "routing_modality", "modality_routing_weights", "AdaptedNorm", "AdapterConfig", "adapters", "enable_gradient_checkpointing",
           "freeze_all_but_adapters", "is_merged",
           "merge_adapters", "patch_clip_vision", "patch_llama", "patch_state",
           "record_routing_weights", "reset_routing_cache", "set_backend", "set_single_modality",
           "unmerge_adapters", "unpatch", "unpatched"]
