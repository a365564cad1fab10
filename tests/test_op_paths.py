"""The eager autograd.Function path and the registered custom op (what torch.compile traces)
share one implementation: they must give identical outputs and gradients."""
import pytest
import torch

from mlan_kernels.ops.mm_adapter import mm_adapter
from tests.helpers import make_adapter_inputs

NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "router_weight", "router_bias")


def _grads(call, inputs, grad_y):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y = call(leaves)
    y.backward(grad_y)
    return [y] + [leaves[k].grad for k in NAMES]


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_custom_op_autograd_equals_eager_function(dropout_p, device):
    inputs = make_adapter_inputs(2, 5, 64, 8, 2, 2, torch.float32, device)
    inputs = {k: inputs[k] for k in NAMES}
    grad_y = torch.randn_like(inputs["x"])
    seed = torch.tensor(7)

    def eager(p):
        return mm_adapter(*(p[k] for k in NAMES), scale=0.5, temperature=3.0, dropout_p=dropout_p,
                          seed=seed, groups=2)

    def registered(p):
        return torch.ops.mlan.mm_adapter(*(p[k] for k in NAMES), None, 0.5, 3.0, dropout_p,
                                         seed if dropout_p else None, 2)[0]

    for a, b in zip(_grads(eager, inputs, grad_y), _grads(registered, inputs, grad_y)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
