"""Auxiliary loss (our interpretation of CoMMIT): off by default, reaches only the lagging
side, and λ > 0 increases the step-to-step KL of the generation distribution on a toy model."""
import pytest
import torch
from torch import nn

from mlan_kernels.ops.kl_div import kl_div_logits
from mlan_kernels.training import auxiliary_kl_loss, backward_auxiliary, lagging_side

from test_balance_monitor import TwoSideToy, toy_sides


def step_to_step_kl(weight, steps=12, probe_every=3):
    """Mean KL(p_{t+1} ‖ p_t) over an SGD run; L_aux (vs the distribution cached at the last
    probe) goes to the language side only."""
    torch.manual_seed(0)
    model = TwoSideToy()
    feature, language = toy_sides(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    x, targets = torch.randn(16, 8), torch.randint(0, 30, (16,))
    previous, last, kls = None, None, []
    for step in range(steps):
        logits = model(x)
        if last is not None:
            kls.append(float(kl_div_logits(logits.detach(), last)))
        last = logits.detach()
        optimizer.zero_grad()
        nn.functional.cross_entropy(logits, targets).backward(retain_graph=True)
        if previous is not None:
            backward_auxiliary(auxiliary_kl_loss(logits, previous, weight=weight), language)
        if step % probe_every == 0:
            previous = logits.detach()
        optimizer.step()
    return sum(kls) / len(kls)


def test_positive_weight_increases_step_to_step_kl():
    # The gradient of KL(p_prev ‖ p) is λ·(p − p_prev): small while p stays near p_prev, so
    # the effect grows with λ (measured: λ=0 2.8e-4, 1: 3.0e-4, 5: 3.5e-4, 20: 3.4e-3).
    kls = [step_to_step_kl(weight) for weight in (0.0, 5.0, 20.0)]
    assert kls[0] < kls[1] < kls[2] and kls[2] > 2 * kls[0], kls


def test_gradient_reaches_only_the_lagging_side():
    model = TwoSideToy()
    feature, language = toy_sides(model)
    x = torch.randn(4, 8)
    previous = model(x).detach() + torch.randn(4, 30)
    aux = auxiliary_kl_loss(model(x), previous, weight=0.5)
    assert aux < 0
    backward_auxiliary(aux, language)
    assert all(p.grad is None for p in feature)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in language)


def test_off_by_default_and_lagging_side():
    logits = torch.randn(3, 5, requires_grad=True)
    assert auxiliary_kl_loss(logits, torch.randn(3, 5)).item() == 0.0
    mask = torch.tensor([True, False, True])
    previous = torch.randn(3, 5)
    expected = -0.3 * kl_div_logits(previous, logits.detach(), mask)
    torch.testing.assert_close(auxiliary_kl_loss(logits, previous, mask, weight=0.3), expected)
    assert lagging_side(None) is None and lagging_side(1.0) is None
    assert lagging_side(2.0) == "language" and lagging_side(0.5) == "feature"
    with pytest.raises(ValueError, match="weight"):
        auxiliary_kl_loss(logits, previous, weight=-1.0)
    with pytest.raises(ValueError, match="lagging_params"):
        backward_auxiliary(logits.sum(), [])
