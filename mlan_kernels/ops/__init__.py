"""Custom ops (registered in the `mlan` torch.library namespace on import)."""
from .mm_adapter import mm_adapter, new_dropout_seed

__all__ = ["mm_adapter", "new_dropout_seed"]
