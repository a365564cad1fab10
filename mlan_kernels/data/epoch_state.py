"""Epoch/position bookkeeping shared by the samplers: deterministic per-(seed, epoch) generators
and exact mid-epoch resume.

Semantics: `position` counts items yielded in the current epoch. Finishing an epoch moves to
the next one (position 0), so a sampler reused without set_epoch still reshuffles, and a state
saved after an epoch says "start the next". `set_epoch(e)` with e == the current epoch keeps the
position (so `load_state_dict` followed by the usual `for e in ...: set_epoch(e)` loop resumes),
any other e starts that epoch from 0.
Caveat: a DataLoader with workers pulls items ahead of training; to resume exactly, save
{"epoch": e, "position": items_trained_on} rather than the sampler's own count.
"""
from typing import Iterator

import torch

from .checks import check_int

SEED_STRIDE = 1_000_003


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """CPU generator seeded with seed * 1_000_003 + epoch."""
    return torch.Generator().manual_seed(seed * SEED_STRIDE + epoch)


class EpochState:
    """Mixin (list it before torch's Sampler): subclasses define `_epoch_items(epoch) -> list`
    (the epoch's items, in order) and `__len__`; this gives set_epoch, __iter__, state_dict,
    load_state_dict."""
    epoch: int = 0
    position: int = 0

    def set_epoch(self, epoch: int) -> None:
        epoch = check_int("epoch", epoch)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator:
        """The current epoch's items from `position` on; advances the epoch at its end."""
        items = self._epoch_items(self.epoch)
        while self.position < len(items):
            item = items[self.position]
            self.position += 1
            yield item
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """{"epoch": current epoch, "position": items already yielded in it}."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continue at state["epoch"], skipping its first state["position"] items."""
        epoch = check_int('state["epoch"]', state.get("epoch"))
        position = check_int('state["position"]', state.get("position"))
        if position > len(self):
            raise ValueError(f'state["position"] must be <= {len(self)} (items per epoch), '
                             f"got {position}")
        self.epoch, self.position = epoch, position
