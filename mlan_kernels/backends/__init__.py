"""MM-Adapter backends: modules with the same `forward`/`backward` (see mlan_kernels.dispatch)."""
