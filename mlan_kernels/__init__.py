"""mlan-kernels: fused MM-Adapter (LaVIN) kernels and mixed-modality training utilities."""
from . import dispatch, training
from .checkpoint import load_adapters, load_lavin_adapters, save_adapters
from .config import AdapterConfig
from .integrations import (merge_adapters, patch, patch_clip_vision, patch_llama,
                           modality_routing_weights, record_routing_weights, routing_modality,
                           set_backend, unmerge_adapters, unpatch,
                           unpatched)
from .integrations.export import export_merged
from .integrations.lavin import LavinModel, build_lavin
from .modules import MMAdapter
from .ops import fused_linear_kl, kl_div_logits, mm_adapter, scale_grads_
from .summary import count_trainable_parameters, summary

__version__ = "0.1.0"
__all__ = ["MMAdapter", "mm_adapter", "dispatch", "AdapterConfig", "patch",
           "patch_llama", "patch_clip_vision",
           "unpatch", "unpatched", "routing_modality", "modality_routing_weights", "merge_adapters", "unmerge_adapters", "record_routing_weights", "set_backend",
           "LavinModel", "build_lavin", "export_merged", "save_adapters", "load_adapters", "load_lavin_adapters",
           "summary", "count_trainable_parameters", "training", "kl_div_logits", "fused_linear_kl",
           "scale_grads_", "__version__"]
