"""Eager cost of the custom-op boundary: µs per call of the MM-Adapter op through each design.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/dispatch_cost.py [--device cpu] [--repeat 7]

Designs (same kernels, small shapes so that the Python/dispatcher overhead shows):
  function         plain autograd.Function calling the Python implementation (today's eager path)
  registered op    torch.library.custom_op with register_autograd, called eagerly
  function + ops   flash-attention's shape: one autograd.Function whose forward and backward
                   call custom ops (CustomOpDef objects) that have fakes and no autograd
  function + .default   the same, calling the ops' OpOverload (torch.ops.ns.op.default)
  ctx function + ...    old-style Functions (forward(ctx, ...) sets up the context itself)
and the bare calls: the forward implementation vs its custom op (CustomOpDef / OpOverload).
Prints one line per design: the minimum over --repeat runs of the mean µs per call, in CPU time
of the calling thread (run with OMP_NUM_THREADS=1: a shared machine then slows no row).
"""
import argparse
import importlib
import time

import torch

from tests.helpers import make_adapter_inputs

op_module = importlib.import_module("mlan_kernels.ops.mm_adapter")

NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "router_weight", "router_bias")


@torch.library.custom_op("mlan_bench::mm_adapter_fwd", mutates_args=())
def forward_op(x: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor,
               up_weight: torch.Tensor, up_bias: torch.Tensor, router_weight: torch.Tensor,
               router_bias: torch.Tensor, weights: torch.Tensor | None, scale: float,
               temperature: float, dropout_p: float, seed: torch.Tensor | None, groups: int,
               single_modality: bool | None = None, backend: str = "auto"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return op_module._forward_impl(x, down_weight, down_bias, up_weight, up_bias, router_weight,
                                   router_bias, weights, scale, temperature, dropout_p, seed,
                                   groups, single_modality, backend)


def _function(name, forward, traced):
    """An autograd.Function with `forward`, the op's context setup and backward; traced=True
    makes the backward call the registered backward op instead of the implementation."""
    def setup(ctx, inputs, output):
        op_module._setup_context(ctx, inputs, output)
        ctx.traced = traced
    return type(name, (torch.autograd.Function,), dict(
        forward=staticmethod(forward), setup_context=staticmethod(setup),
        backward=staticmethod(op_module._backward)))


def _ctx_function(name, forward):
    """The same as an old-style Function (forward(ctx, *inputs) saves the context itself): apply
    then skips the inspect.signature binding that a separate setup_context costs per call."""
    def forward_with_ctx(ctx, *inputs):
        output = forward(*inputs)
        op_module._setup_context(ctx, inputs, output)
        return output
    return type(name, (torch.autograd.Function,), dict(
        forward=staticmethod(forward_with_ctx), backward=staticmethod(op_module._backward)))


def _time(rows, iterations, repeat):
    """{label: µs of thread CPU time per call}: the minimum over `repeat` rounds, the rows
    interleaved in each round."""
    best = {label: float("inf") for label, _ in rows}
    for label, call in rows:
        for _ in range(20):
            call()
    for _ in range(repeat):
        for label, call in rows:
            start = time.thread_time()
            for _ in range(iterations):
                call()
            best[label] = min(best[label], (time.thread_time() - start) / iterations * 1e6)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args(argv)
    inputs = make_adapter_inputs(2, 8, 64, 8, 2, 2, torch.float32, args.device)
    leaves = [inputs[name].clone().requires_grad_() for name in NAMES]
    hyper = (None, 1.0, 10.0, 0.0, None, 2, None, "auto")
    grad_y = torch.randn_like(inputs["x"])
    designs = {
        "function": _function("Plain", op_module._forward_impl, traced=False),
        "function + ops": _function("OverOps", forward_op, traced=True),
        "function + .default": _function("OverOverloads", torch.ops.mlan_bench.mm_adapter_fwd.default,
                                         traced=True),
        "ctx function + .default": _ctx_function("CtxOverOverloads",
                                                 torch.ops.mlan_bench.mm_adapter_fwd.default),
        "ctx function + implementation": _ctx_function("CtxPlain", op_module._forward_impl),
    }

    def train_step(apply):
        def call():
            y = apply(*leaves, *hyper)[0]
            y.backward(grad_y)
        return call

    rows = [(f"fwd+bwd  {name}", train_step(fn.apply)) for name, fn in designs.items()]
    rows.append(("fwd+bwd  registered op", train_step(op_module.mm_adapter_op)))
    plain = [inputs[name] for name in NAMES]
    rows += [("fwd      implementation", lambda: op_module._forward_impl(*plain, *hyper)),
             ("fwd      CustomOpDef", lambda: forward_op(*plain, *hyper)),
             ("fwd      OpOverload", lambda: torch.ops.mlan_bench.mm_adapter_fwd.default(*plain, *hyper))]
    y, h, rw = op_module._forward_impl(*plain, *hyper)
    backward_args = (grad_y, plain[0], h, rw, *plain[1:5], 1.0, 0.0, None, 2, "auto")
    rows += [("bwd      implementation", lambda: op_module._backward_impl(*backward_args)),
             ("bwd      CustomOpDef", lambda: op_module.mm_adapter_backward_op(*backward_args)),
             ("bwd      OpOverload", lambda: torch.ops.mlan.mm_adapter_backward.default(*backward_args))]
    print(f"torch {torch.__version__}, device {args.device}, x [2, 8, 64], r 8, E 2, g 2, fp32; "
          f"min over {args.repeat} runs of the mean of {args.iterations} calls")
    for label, micros in _time(rows, args.iterations, args.repeat).items():
        print(f"{label:32s} {micros:8.1f} µs")


if __name__ == "__main__":
    main()
