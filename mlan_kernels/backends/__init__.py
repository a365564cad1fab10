"""Backends of every op: one module per (op, implementation), with the op's functions; the
registry that lists them and picks one is mlan_kernels.dispatch (backends never import it)."""
