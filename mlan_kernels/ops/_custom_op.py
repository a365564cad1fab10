"""The eager / torch.compile split shared by every custom op of this package.

A `torch.library.custom_op` costs hundreds of µs of Python dispatch per call (measured on an
H100 host), so eager calls go through a plain `torch.autograd.Function` running the same
forward, context setup and backward; while torch.compile traces, the registered custom op is
used so the graph sees an opaque op with fake and autograd kernels.
"""
import torch


def eager_function(name: str, forward_impl, setup_context, backward):
    """An autograd.Function with the op's forward, context and backward. `setup_context` must
    set ctx.traced = True (the registered op's case); here it becomes False, so the backward
    calls the plain implementation instead of the registered backward op."""
    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.traced = False
    return type(name, (torch.autograd.Function,), dict(
        __doc__=f"Eager path of {name} (see mlan_kernels.ops._custom_op).",
        forward=staticmethod(forward_impl), setup_context=staticmethod(setup),
        backward=staticmethod(backward)))


def choose_apply(custom_op, eager):
    """The callable to use now: the registered op while compiling, else the eager Function."""
    return custom_op if torch.compiler.is_compiling() else eager.apply
