"""Deprecated: moved to mlan_kernels.integrations.checkpoint_validation (this path goes away in the next release)."""
from .deprecation import alias_moved_module

alias_moved_module(__name__, "mlan_kernels.integrations.checkpoint_validation")
