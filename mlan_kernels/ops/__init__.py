"""Custom ops (registered in the `mlan` torch.library namespace on import)."""
from .fused_linear_kl import fused_linear_kl
from .grad_scale import scale_grads_
from .kl_div import kl_div_logits
from .mm_adapter import mm_adapter, new_dropout_seed

__all__ = ["mm_adapter", "new_dropout_seed", "kl_div_logits", "fused_linear_kl", "scale_grads_"]
