"""mlan-kernels: fused MM-Adapter (LaVIN) kernels and mixed-modality training utilities.

`import mlan_kernels` loads the kernel core only (torch alone): the op, `MMAdapter`, the config,
the dispatcher, KL and grad scaling. The HuggingFace/LaVIN names (`patch`, `build_lavin`,
`save_adapters`, ...; the `hf` extra) and `training` (the `train` extra) load on first use.
"""
import importlib

from . import dispatch
from .config import AdapterConfig
from .modules import MMAdapter
from .ops import fused_linear_kl, kl_div_logits, mm_adapter, scale_grads_
from .requirements import missing_modules

__version__ = "0.1.0"

# name -> module that defines it, imported on first access (module itself when the name is it).
_LAZY = {
    **{name: "mlan_kernels.integrations" for name in (
        "patch", "patch_llama", "patch_clip_vision", "unpatch", "unpatched", "merge_adapters",
        "unmerge_adapters", "record_routing_weights", "set_backend", "routing_modality",
        "modality_routing_weights")},
    "export_merged": "mlan_kernels.integrations.export",
    "LavinModel": "mlan_kernels.integrations.lavin", "build_lavin": "mlan_kernels.integrations.lavin",
    **{name: "mlan_kernels.integrations.checkpoint" for name in (
        "save_adapters", "load_adapters", "load_lavin_adapters")},
    "summary": "mlan_kernels.integrations.summary",
    "count_trainable_parameters": "mlan_kernels.integrations.summary",
    **{name: f"mlan_kernels.{name}" for name in ("integrations", "training", "data")},
}

# `from mlan_kernels import *` takes the lazy names only where their layer can import.
__all__ = ["MMAdapter", "mm_adapter", "dispatch", "AdapterConfig", "kl_div_logits", "fused_linear_kl",
           "scale_grads_", "__version__"]
if not missing_modules("hf"):
    __all__ += [name for name in _LAZY if name not in ("integrations", "data", "training")]
if not missing_modules("train"):
    __all__ += ["training"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'mlan_kernels' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"mlan_kernels.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
