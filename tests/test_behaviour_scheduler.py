"""Behaviour of the LR schedule pieces (training/scheduler.py), stated as properties:
the warm-up/cosine factor's shape and its argument range, the multipliers for every α, the
clip range BalanceScheduler accepts, untagged param groups, and resuming at a given step."""
import math

import pytest
import torch
from torch import nn

from mlan_kernels.training import (BalanceScheduler, CosineWithWarmup, balance_multipliers,
                                   balance_param_groups)
from mlan_kernels.training.scheduler import GROUP_KEY


def _optimizer(lr=0.1, untagged=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2))
    groups = balance_param_groups(model[0].parameters(), model[1].parameters(), lr=lr)
    if untagged:
        groups.append(dict(params=list(model[2].parameters()), lr=lr))   # no "balance_group"
    return torch.optim.SGD(groups)


def _lrs(optimizer):
    return [group["lr"] for group in optimizer.param_groups]


@pytest.mark.parametrize("warmup, total", [(-1, 10), (5, 5), (6, 5)])
def test_warmup_must_be_nonnegative_and_shorter_than_the_run(warmup, total):
    with pytest.raises(ValueError, match="warmup_steps"):
        CosineWithWarmup(warmup, total)


@pytest.mark.parametrize("warmup, total", [(0, 10), (4, 5)])
def test_every_warmup_from_zero_to_one_short_of_the_run_is_accepted(warmup, total):
    schedule = CosineWithWarmup(warmup, total)
    assert schedule(warmup) == pytest.approx(1.0)          # the peak is where the decay starts


@pytest.mark.parametrize("warmup, total, min_ratio", [(3, 10, 0.0), (1, 7, 0.2), (0, 4, 0.1)])
def test_factor_rises_to_one_then_decays_to_min_ratio_and_stays(warmup, total, min_ratio):
    schedule = CosineWithWarmup(warmup, total, min_ratio)
    factors = [schedule(step) for step in range(3 * total)]
    assert all(min_ratio - 1e-12 <= f <= 1.0 + 1e-12 for f in factors)   # never above the peak
    assert max(factors) == pytest.approx(1.0) and factors[warmup] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:warmup - 1], factors[1:warmup]))      # rising
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1:]))      # then never rising
    assert factors[total:] == pytest.approx([min_ratio] * (2 * total))              # floor held
    for step in range(warmup, total + 1):                   # the cosine itself
        progress = (step - warmup) / (total - warmup)
        assert factors[step] == pytest.approx(min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("kappa", [0.5, 3.0])
def test_multipliers_are_kappa_to_the_minus_and_plus_alpha_for_every_positive_alpha(alpha, kappa):
    multipliers = balance_multipliers(kappa, alpha=alpha, clip=(1e-6, 1e6))
    assert multipliers == pytest.approx({"feature": kappa ** -alpha, "language": kappa ** alpha})


@pytest.mark.parametrize("clip", [(0.0, 10.0), (-0.1, 10.0), (1.5, 10.0), (0.1, 0.9), (0.1,), (0.1, 1, 10)])
def test_clip_outside_the_documented_range_is_rejected(clip):
    with pytest.raises(ValueError, match="clip"):
        BalanceScheduler(_optimizer(), clip=clip)


@pytest.mark.parametrize("clip", [(1.0, 10.0), (0.1, 1.0), (1.0, 1.0)])
def test_clip_bounds_of_exactly_one_are_accepted_and_honoured(clip):
    optimizer = _optimizer(lr=0.1)
    scheduler = BalanceScheduler(optimizer, alpha=1.0, clip=clip)
    scheduler.update_kappa(4.0)
    optimizer.step()
    scheduler.step()
    low, high = clip
    assert _lrs(optimizer) == pytest.approx([0.1 * min(max(0.25, low), high), 0.1 * min(max(4.0, low), high)])


def test_a_group_tagged_with_an_unknown_side_is_rejected_by_name():
    optimizer = _optimizer()
    optimizer.param_groups[1][GROUP_KEY] = "vision"
    with pytest.raises(ValueError, match=f"param group 1: {GROUP_KEY} must be .*'vision'"):
        BalanceScheduler(optimizer)


def test_untagged_groups_follow_the_base_schedule_with_multiplier_one():
    optimizer = _optimizer(lr=0.1, untagged=True)
    schedule = CosineWithWarmup(2, 10)
    scheduler = BalanceScheduler(optimizer, schedule, alpha=1.0)
    scheduler.update_kappa(4.0)
    for step in range(1, 5):
        optimizer.step()
        scheduler.step()
        assert _lrs(optimizer) == pytest.approx([0.1 * schedule(step) * m for m in (0.25, 4.0, 1.0)])


def test_a_scheduler_built_at_a_given_step_continues_from_there():
    schedule = CosineWithWarmup(2, 10, 0.1)
    stepped = _optimizer(lr=0.1)
    scheduler = BalanceScheduler(stepped, schedule)
    for _ in range(5):
        stepped.step()
        scheduler.step()
    resumed = _optimizer(lr=0.1)
    for group in resumed.param_groups:
        group["initial_lr"] = 0.1                       # as a resumed optimizer's state holds
    resumed_scheduler = BalanceScheduler(resumed, schedule, last_epoch=4)   # its first step() -> 5
    assert resumed_scheduler.last_epoch == scheduler.last_epoch == 5
    assert _lrs(resumed) == pytest.approx(_lrs(stepped)) and _lrs(resumed)[0] == pytest.approx(0.1 * schedule(5))
