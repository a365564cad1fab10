"""The oracle: the MM-Adapter, the KL and the grad scaling in plain torch, short and commented
with shapes. Test-only: tests and the benchmark harness compare every backend against it; no
runtime module imports it (tests/test_layering.py checks). Nobody fixes a backend by changing it.

The production helpers it builds on (router softmax, grouped up-weight forms, dropout mask,
row reductions) are re-exported from mlan_kernels.functional for the tests' convenience.
"""
from ..functional import (REDUCTIONS, compact_up_weight, compute_dtype, dense_up_weight,
                          dropout_keep_mask, dropout_threshold, philox_uint32, reduce_rows,
                          routing_weights)
from .grad_scale import scale_grads_reference
from .kl import kl_div_logits_reference, kl_rows_grad_reference, kl_rows_reference
from .mm_adapter import mm_adapter_backward_reference, mm_adapter_reference

__all__ = ["mm_adapter_reference", "mm_adapter_backward_reference", "kl_rows_reference", "kl_div_logits_reference",
           "kl_rows_grad_reference", "scale_grads_reference", "REDUCTIONS", "compact_up_weight",
           "compute_dtype", "dense_up_weight", "dropout_keep_mask", "dropout_threshold",
           "philox_uint32", "reduce_rows", "routing_weights"]
