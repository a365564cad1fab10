"""Eager cost of the custom-op boundary: µs per call of the MM-Adapter op and its pieces.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/dispatch_cost.py [--repeat 15]

Rows (small shapes, so that the Python/dispatcher overhead shows):
  fwd+bwd  MMAdapterFunction     the op's one autograd path (old-style autograd.Function whose
                                 forward/backward call the custom ops' OpOverloads)
  fwd/bwd  implementation | CustomOpDef | OpOverload
                                 the bare forward/backward: the Python implementation called
                                 directly, through the custom op object, through .default
  Function setup_context | forward(ctx)
                                 a 15-argument autograd.Function doing nothing: the new-style
                                 form (separate setup_context) binds the arguments with
                                 inspect.signature on every apply, the old-style one does not
Each row: the minimum over --repeat rounds (rows interleaved) of the mean thread CPU time per
call (run with OMP_NUM_THREADS=1 on a shared machine). The two-path design this replaced is
measured by this script at commit 8daebca.
"""
import argparse
import importlib
import time

import torch

from mlan_kernels.testing import make_adapter_inputs

op_module = importlib.import_module("mlan_kernels.ops.mm_adapter")
NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "router_weight", "router_bias")


class _SetupContextStyle(torch.autograd.Function):
    @staticmethod
    def forward(x, a, b, c, d, e, f, g, h, i, j, k, l, m, n):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.hyper = inputs[1:]

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + (None,) * 14


class _CtxStyle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, c, d, e, f, g, h, i, j, k, l, m, n):
        ctx.hyper = (a, b, c, d, e, f, g, h, i, j, k, l, m, n)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + (None,) * 14


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

    def train_step():
        op_module.MMAdapterFunction.apply(*leaves, *hyper)[0].backward(grad_y)

    plain = [inputs[name] for name in NAMES]
    y, h, rw, saved = op_module._forward_impl(*plain, *hyper)
    backward_args = (grad_y, None, plain[0], h, rw, saved, *plain[1:6], None, 1.0, 10.0, 0.0, None,
                     2, False, "auto")
    small = torch.ones(4, requires_grad=True)
    rows = [("fwd+bwd  MMAdapterFunction", train_step),
            ("fwd      implementation", lambda: op_module._forward_impl(*plain, *hyper)),
            ("fwd      CustomOpDef", lambda: op_module.mm_adapter_op(*plain, *hyper)),
            ("fwd      OpOverload", lambda: torch.ops.mlan.mm_adapter.default(*plain, *hyper)),
            ("bwd      implementation", lambda: op_module._backward_impl(*backward_args)),
            ("bwd      CustomOpDef", lambda: op_module.mm_adapter_backward_op(*backward_args)),
            ("bwd      OpOverload", lambda: torch.ops.mlan.mm_adapter_backward.default(*backward_args)),
            ("Function setup_context", lambda: _SetupContextStyle.apply(small, *range(14))),
            ("Function forward(ctx)", lambda: _CtxStyle.apply(small, *range(14)))]
    print(f"torch {torch.__version__}, device {args.device}, x [2, 8, 64], r 8, E 2, g 2, fp32; "
          f"min over {args.repeat} rounds of the mean of {args.iterations} calls")
    for label, micros in _time(rows, args.iterations, args.repeat).items():
        print(f"{label:32s} {micros:8.1f} µs")


if __name__ == "__main__":
    main()
