"""One autograd path per op: eager calls and torch.compile run the same autograd.Function
(flash-attention's boundary); the kernel entry points are custom ops without autograd."""
import pytest
import torch

from mlan_kernels.ops.mm_adapter import mm_adapter
from helpers import make_adapter_inputs

NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "router_weight", "router_bias")


def _grads(call, inputs, grad_y):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y = call(leaves)
    y.backward(grad_y)
    return [y] + [leaves[k].grad for k in NAMES]


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_compiled_graph_equals_eager(dropout_p, device):
    inputs = make_adapter_inputs(2, 5, 64, 8, 2, 2, torch.float32, device)
    inputs = {k: inputs[k] for k in NAMES}
    grad_y = torch.randn_like(inputs["x"])
    seed = torch.tensor(7)

    def eager(p):
        return mm_adapter(*(p[k] for k in NAMES), scale=0.5, temperature=3.0, dropout_p=dropout_p,
                          seed=seed, groups=2, backend="reference")

    torch._dynamo.reset()
    compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)
    for a, b in zip(_grads(eager, inputs, grad_y), _grads(compiled, inputs, grad_y)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_kernel_entry_points_have_no_autograd_of_their_own():
    """Differentiating needs the Function: the registered op alone is a kernel call."""
    inputs = make_adapter_inputs(2, 3, 16, 4, 2, 2, torch.float32, "cpu")
    leaves = [inputs[k].clone().requires_grad_() for k in NAMES]
    y = torch.ops.mlan.mm_adapter(*leaves, None, 1.0, 10.0, 0.0, None, 2)[0]
    with pytest.raises(RuntimeError, match="autograd"):
        y.sum().backward()
