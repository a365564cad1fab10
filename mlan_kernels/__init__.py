"""mlan-kernels: fused MM-Adapter (LaVIN) kernels and mixed-modality training utilities."""
from . import dispatch, reference
from .modules import MMAdapter
from .ops import mm_adapter

__version__ = "0.1.0"
__all__ = ["MMAdapter", "mm_adapter", "dispatch", "reference", "__version__"]
