"""Training utilities: CoMMIT balance coefficient, dynamic LR scheduler, auxiliary loss.

Everything CoMMIT-specific here is OUR INTERPRETATION of the paper (no public code); see
docs/commit_balance.md and the README section "CoMMIT balance (our interpretation)".
Layering: imports ops / integrations, never the reverse.
"""
from ..requirements import require_extra

require_extra("train", __name__)

from .auxiliary import auxiliary_kl_loss, backward_auxiliary, lagging_side
from .balance import FEATURE, LANGUAGE, BalanceMonitor, balance_groups
from .scheduler import (BalanceScheduler, CosineWithWarmup, balance_multipliers,
                        balance_param_groups)

__all__ = ["BalanceMonitor", "BalanceScheduler", "CosineWithWarmup", "FEATURE", "LANGUAGE",
           "auxiliary_kl_loss", "backward_auxiliary", "balance_groups", "balance_multipliers",
           "balance_param_groups", "lagging_side"]
