"""BalanceScheduler (our interpretation of CoMMIT's dynamic scheduler): multipliers move the
right way, α = 0 is the constant baseline, cosine-with-warmup composition, state round trip,
and why it sets LRs: AdamW ignores a constant per-tensor gradient scale."""
import copy
import math

import pytest
import torch
from torch import nn

from mlan_kernels.training import (BalanceScheduler, CosineWithWarmup, balance_multipliers,
                                   balance_param_groups)


def make_optimizer(lr=1e-2, cls=torch.optim.AdamW):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    groups = balance_param_groups(model[0].parameters(), model[1].parameters(), lr=lr)
    return model, cls(groups)


def test_multipliers_move_in_the_right_direction():
    assert balance_multipliers(None) == {"feature": 1.0, "language": 1.0}
    assert balance_multipliers(4.0) == pytest.approx({"feature": 0.5, "language": 2.0})      # α = 0.5
    assert balance_multipliers(0.25) == pytest.approx({"feature": 2.0, "language": 0.5})
    assert balance_multipliers(1e6) == pytest.approx({"feature": 0.1, "language": 10.0})     # clipped
    assert balance_multipliers(1e6, alpha=0.0) == {"feature": 1.0, "language": 1.0}         # baseline
    previous = balance_multipliers(1.0)
    for kappa in (1.5, 3.0, 9.0):
        current = balance_multipliers(kappa)
        assert current["feature"] < previous["feature"] and current["language"] > previous["language"]
        previous = current


def test_scheduler_sets_group_lrs_on_top_of_cosine_warmup():
    _, optimizer = make_optimizer(lr=0.1)
    base = CosineWithWarmup(warmup_steps=2, total_steps=10, min_ratio=0.1)
    scheduler = BalanceScheduler(optimizer, base, alpha=0.5, clip=(0.1, 10))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.05])  # warm-up 1/2
    scheduler.update_kappa(4.0)
    optimizer.step()
    scheduler.step()                                                     # step 1: factor 1
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.2])
    for _ in range(8):
        optimizer.step()
        scheduler.step()
    factor = base(9)
    assert factor == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 * factor * 0.5, 0.1 * factor * 2])


def test_alpha_zero_is_the_constant_baseline():
    _, optimizer = make_optimizer(lr=0.1)
    scheduler = BalanceScheduler(optimizer, alpha=0.0)
    scheduler.update_kappa(100.0)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1]


def test_state_dict_round_trip():
    _, optimizer = make_optimizer()
    scheduler = BalanceScheduler(optimizer, CosineWithWarmup(3, 20), alpha=0.7, clip=(0.2, 5))
    for step in range(5):
        scheduler.update_kappa(1.0 + step)
        optimizer.step()
        scheduler.step()
    state = copy.deepcopy(scheduler.state_dict())
    _, optimizer2 = make_optimizer()
    resumed = BalanceScheduler(optimizer2, CosineWithWarmup(3, 20))
    resumed.load_state_dict(state)
    assert resumed.kappa_hat == scheduler.kappa_hat and resumed.alpha == 0.7
    for _ in range(3):
        for opt, sched in ((optimizer, scheduler), (optimizer2, resumed)):
            opt.step()
            sched.step()
        assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in optimizer2.param_groups]


def _adamw_update(grad_scale, lr_scale=1.0, steps=3):
    """Parameter change of AdamW after `steps` steps with gradients × grad_scale, lr × lr_scale."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(10))
    start = param.detach().clone()
    optimizer = torch.optim.AdamW([param], lr=1e-2 * lr_scale, eps=1e-12, weight_decay=0.0)
    for step in range(steps):
        param.grad = torch.randn(10, generator=torch.Generator().manual_seed(step)) * grad_scale
        optimizer.step()
    return param.detach() - start


def test_adamw_ignores_gradient_scale_but_not_lr():
    baseline = _adamw_update(1.0)
    torch.testing.assert_close(_adamw_update(10.0), baseline, rtol=1e-5, atol=1e-8)   # no effect
    torch.testing.assert_close(_adamw_update(0.1), baseline, rtol=1e-5, atol=1e-8)
    lr_scaled = _adamw_update(1.0, lr_scale=2.0)
    torch.testing.assert_close(lr_scaled, 2 * baseline, rtol=1e-5, atol=1e-8)          # LR does
    # ... and the scheduler's multiplier is exactly such an LR change:
    _, optimizer = make_optimizer(lr=1e-2)
    scheduler = BalanceScheduler(optimizer)
    scheduler.update_kappa(0.25)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-2)


@pytest.mark.parametrize("kwargs, message", [(dict(alpha=-1), "alpha"), (dict(clip=(2, 10)), "clip")])
def test_arguments(kwargs, message):
    _, optimizer = make_optimizer()
    with pytest.raises(ValueError, match=message):
        BalanceScheduler(optimizer, **kwargs)
    scheduler = BalanceScheduler(optimizer)
    with pytest.raises(ValueError, match="kappa_hat"):
        scheduler.update_kappa(0.0)
