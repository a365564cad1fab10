"""mlan-kernels: fused MM-Adapter (LaVIN) kernels and mixed-modality training utilities."""
from . import dispatch, reference
try:
    from .modules import MMAdapter
except ImportError:  # TEMP until modules.py lands
    MMAdapter = None
from .ops import mm_adapter

__version__ = "0.1.0"
__all__ = ["MMAdapter", "mm_adapter", "dispatch", "reference", "__version__"]
