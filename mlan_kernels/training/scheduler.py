"""Dynamic per-group learning rates from the balance coefficient κ̂ (CoMMIT's "dynamic learning
scheduler"; the formula is OUR INTERPRETATION, see docs/commit_balance.md):

    m_feat = clip(κ̂^(−α), m_min, m_max),   m_lang = clip(κ̂^(α), m_min, m_max)
    lr_group(step) = base_lr_group · base_schedule(step) · m_group

κ̂ > 1 (the feature side moves the output more) slows the feature side and speeds up the
language side; α = 0 gives m = 1: the constant-multiplier baseline. The multipliers act on the
learning rate, not on gradients: Adam/AdamW normalise a gradient by its own running RMS, so a
constant gradient scale per tensor changes nothing (up to ε); tests/test_scheduler.py shows it.

    optimizer = torch.optim.AdamW(balance_param_groups(*balance_groups(model), lr=1e-3))
    scheduler = BalanceScheduler(optimizer, CosineWithWarmup(warmup_steps=100, total_steps=10000))
    ...; optimizer.step(); record = monitor.after_step(...)
    if record: scheduler.update_kappa(record["kappa_ema"])
    scheduler.step()
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .balance import FEATURE, LANGUAGE, check_kappa_hat, finite_number

GROUP_KEY = "balance_group"


@dataclass
class CosineWithWarmup:
    """LR factor: linear warm-up 0 → 1 over warmup_steps, then cosine decay to min_ratio at
    total_steps (LaVIN's schedule shape). A plain dataclass so scheduler state pickles."""
    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0

    def __post_init__(self):
        if self.warmup_steps < 0 or self.total_steps <= self.warmup_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {self.warmup_steps}, {self.total_steps}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_balance_settings(alpha, clip=(0.1, 10.0)):
    """ValueError unless alpha is a finite number >= 0 and clip a pair (m_min, m_max) of finite
    numbers with 0 < m_min <= 1 <= m_max (a NaN alpha makes every LR NaN; a negative clip
    trains with negative LRs, i.e. gradient ascent; a reversed one pins both multipliers)."""
    if not (finite_number(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    try:
        low, high = clip
    except (TypeError, ValueError):
        raise ValueError(f"clip must be a pair (m_min, m_max), got {clip!r}") from None
    if not (finite_number(low) and finite_number(high) and 0 < low <= 1 <= high):
        raise ValueError(f"clip must be (m_min, m_max) of finite numbers with 0 < m_min <= 1 <= "
                         f"m_max, got {tuple(clip)!r}")


def balance_multipliers(kappa_hat: Optional[float], alpha: float = 0.5,
                        clip: Sequence[float] = (0.1, 10.0)) -> dict:
    """{"feature": m_feat, "language": m_lang} from κ̂ (1, 1 before the first probe)."""
    if kappa_hat is None or alpha == 0:
        return {FEATURE: 1.0, LANGUAGE: 1.0}
    low, high = clip
    power = kappa_hat ** alpha
    return {FEATURE: min(max(1.0 / power, low), high), LANGUAGE: min(max(power, low), high)}


def balance_param_groups(feature_params, language_params, **options) -> list:
    """Two optimizer param groups tagged with their side ("balance_group"); `options`
    (lr, weight_decay, ...) apply to both."""
    return [dict(params=list(feature_params), **{GROUP_KEY: FEATURE}, **options),
            dict(params=list(language_params), **{GROUP_KEY: LANGUAGE}, **options)]


class BalanceScheduler(torch.optim.lr_scheduler.LRScheduler):
    """An lr_scheduler that sets lr = initial_lr · base_schedule(step) · m_side for every param
    group tagged "balance_group" ("feature" / "language"; untagged groups get m = 1).

    base_schedule: a callable step -> factor (e.g. CosineWithWarmup), None = constant 1.
    alpha ≥ 0, clip = (m_min, m_max) with 0 < m_min ≤ 1 ≤ m_max. update_kappa(κ̂) takes effect
    at the next step(). state_dict()/load_state_dict() round-trip κ̂ and the step count.
    """

    def __init__(self, optimizer, base_schedule=None, alpha: float = 0.5,
                 clip: Sequence[float] = (0.1, 10.0), last_epoch: int = -1):
        check_balance_settings(alpha, clip)
        for index, group in enumerate(optimizer.param_groups):
            if group.get(GROUP_KEY, FEATURE) not in (FEATURE, LANGUAGE):
                raise ValueError(f"param group {index}: {GROUP_KEY} must be 'feature' or "
                                 f"'language', got {group[GROUP_KEY]!r}")
        self.base_schedule, self.alpha, self.clip = base_schedule, float(alpha), tuple(clip)
        self.kappa_hat: Optional[float] = None
        super().__init__(optimizer, last_epoch)

    def update_kappa(self, kappa_hat: float):
        """Use κ̂ (e.g. BalanceMonitor's record["kappa_ema"]) from the next step() on."""
        if kappa_hat is None:
            raise ValueError("kappa_hat must be a finite number > 0, got None")
        check_kappa_hat(kappa_hat)
        self.kappa_hat = float(kappa_hat)

    @property
    def multipliers(self) -> dict:
        return balance_multipliers(self.kappa_hat, self.alpha, self.clip)

    def get_lr(self):
        factor = 1.0 if self.base_schedule is None else self.base_schedule(max(self.last_epoch, 0))
        multipliers = self.multipliers
        return [group["initial_lr"] * factor * multipliers.get(group.get(GROUP_KEY), 1.0)
                for group in self.optimizer.param_groups]
