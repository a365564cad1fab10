"""MLAN mixtures: a text/image mixture of exact proportions (redrawn every epoch, or drawn once
as MLAN's fixed mixture files), and modality-grouped, length-grouped batches sharded over ranks:
our single-modality grouping, or MLAN's own (LLaVA's `group_by_modality_length`, llava_grouping).

Both samplers are deterministic for (seed, epoch) and resume mid-epoch (see epoch_state). All
ranks must build them with the same arguments but `rank`, so they agree on every global batch.
"""
from typing import Optional, Sequence

import torch
from torch.utils.data import Sampler

from .checks import check_fraction, check_int
from .epoch_state import EpochState, epoch_generator
from .llava_grouping import modality_length_grouped_indices

GROUPINGS = ("modality", "llava")


def _draw(indices: Sequence[int], count: int, replacement: bool, generator) -> list[int]:
    """`count` of `indices`, uniformly at random (distinct unless replacement)."""
    if replacement:
        picks = torch.randint(len(indices), (count,), generator=generator)
    else:
        picks = torch.randperm(len(indices), generator=generator)[:count]
    return [indices[i] for i in picks.tolist()]


def _largest_mixture(text_available: int, image_available: int, language_share: float) -> int:
    """Largest n with round(share·n) <= text_available, n - round(share·n) <= image_available."""
    for n in range(text_available + image_available, 0, -1):
        text = round(language_share * n)
        if text <= text_available and n - text <= image_available:
            return n
    return 0


class MixtureSampler(EpochState, Sampler[int]):
    """Exactly round(language_share·n) (Python's round: half to even) of `text_indices` and the
    rest of `image_indices`, in one shuffled order per epoch (the given dataset indices, so one
    dataset can hold both modalities).

    num_samples n: default the largest n whose counts fit without replacement (all the data
    when the share matches it). Without replacement within an epoch unless `replacement`.
    resample_each_epoch: True (default) draws a new subset every epoch, so over several epochs
    more of the data is seen; False draws it once (from the epoch-0 generator) and only
    reshuffles its order, like MLAN, which writes each mixture to a file offline and trains on
    that fixed set.
    """

    def __init__(self, text_indices: Sequence[int], image_indices: Sequence[int],
                 language_share: float, num_samples: Optional[int] = None, seed: int = 0,
                 replacement: bool = False, resample_each_epoch: bool = True):
        self.text_indices = [int(i) for i in text_indices]
        self.image_indices = [int(i) for i in image_indices]
        self.language_share = check_fraction("language_share", language_share)
        self.seed = check_int("seed", seed)
        self.replacement = bool(replacement)
        if not isinstance(resample_each_epoch, bool):
            raise ValueError(f"resample_each_epoch must be True or False, got {resample_each_epoch!r}")
        self.resample_each_epoch = resample_each_epoch
        for name, indices, needed in (("text", self.text_indices, self.language_share > 0),
                                      ("image", self.image_indices, self.language_share < 1)):
            if needed and not indices:
                raise ValueError(f"language_share={self.language_share} needs {name} samples "
                                 f"but {name}_indices is empty")
        if num_samples is None:
            num_samples = _largest_mixture(len(self.text_indices), len(self.image_indices),
                                           self.language_share)
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.text_count = round(self.language_share * self.num_samples)
        self.image_count = self.num_samples - self.text_count
        self._check_counts()

    def _check_counts(self) -> None:
        for name, count, available in (("text", self.text_count, len(self.text_indices)),
                                       ("image", self.image_count, len(self.image_indices))):
            if count > available and not self.replacement:
                raise ValueError(f"num_samples={self.num_samples} with language_share="
                                 f"{self.language_share} needs {count} {name} samples, only "
                                 f"{available} exist; lower num_samples or pass replacement=True")

    @property
    def counts(self) -> dict:
        """{"text": text samples per epoch, "image": image samples per epoch}."""
        return {"text": self.text_count, "image": self.image_count}

    def epoch_indices(self, epoch: int) -> list[int]:
        """The epoch's dataset indices in their shuffled order (pure: no state change)."""
        generator = epoch_generator(self.seed, epoch)
        subset = generator if self.resample_each_epoch else epoch_generator(self.seed, 0)
        chosen = (_draw(self.text_indices, self.text_count, self.replacement, subset)
                  + _draw(self.image_indices, self.image_count, self.replacement, subset))
        return [chosen[i] for i in torch.randperm(len(chosen), generator=generator).tolist()]

    def _epoch_items(self, epoch: int) -> list[int]:
        return self.epoch_indices(epoch)

    def __len__(self) -> int:
        return self.num_samples


class ModalityLengthBatchSampler(EpochState, Sampler[list[int]]):
    """Batches of similar length, sharded over ranks; two groupings of the epoch's mixture.

    grouping="modality" (default, ours): every global batch holds one modality. Per epoch:
    mixture.epoch_indices(epoch) split by modality (order kept: random); each modality cut into
    mega-batches of `mega_batch_size` samples (default 8 global batches), each sorted by length
    (descending; skipped when group_by_length=False: the random-batching baseline) and cut into
    global batches of batch_size·world_size; the order of all global batches of both modalities
    is shuffled. An incomplete last global batch of a modality is dropped when drop_last
    (default), else split as evenly as possible over the ranks (dropped if it has fewer samples
    than ranks).

    grouping="llava" (MLAN's code, llava_grouping.py): the epoch's mixture in dataset order,
    lengths signed by modality, ordered by LLaVA's get_modality_length_grouped_indices with
    mega-batch = world_size·batch_size·gradient_accumulation_steps (one optimizer step): sorted
    by length inside a mega-batch, then dealt so the ranks' length sums balance; each
    modality's last mega-batch goes into one final mixed-modality stretch. The stream is cut
    into global batches; an incomplete last one is topped up with the epoch's first samples
    (what HF Trainer's accelerate does with even_batches), or dropped if drop_last=True.
    Draws use the (seed, epoch) generator rather than LLaVA's global RNG, so every rank agrees
    and resume works; torch.manual_seed(seed·1_000_003 + epoch) makes LLaVA's function give
    the same order.

    Rank r yields samples [r·batch_size, (r+1)·batch_size) of each global batch (accelerate's
    assignment of consecutive per-device batches to ranks). Lengths are what sorting and
    padding_ratio use (token counts; LLaVA uses word counts). Uses only
    mixture.epoch_indices, not the mixture's own iteration state.
    """

    def __init__(self, mixture: MixtureSampler, lengths: Sequence[int], has_image: Sequence[bool],
                 batch_size: int, world_size: int = 1, rank: int = 0,
                 mega_batch_size: Optional[int] = None, drop_last: Optional[bool] = None,
                 seed: int = 0, group_by_length: bool = True, grouping: str = "modality",
                 gradient_accumulation_steps: int = 1):
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
        self.grouping = grouping
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.world_size = check_int("world_size", world_size, minimum=1)
        self.rank = check_int("rank", rank)
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.gradient_accumulation_steps = check_int("gradient_accumulation_steps",
                                                     gradient_accumulation_steps, minimum=1)
        self.global_batch_size = batch_size * world_size
        if grouping == "llava":
            if mega_batch_size is not None or not group_by_length:
                raise ValueError("grouping='llava' fixes the mega-batch (world_size·batch_size·"
                                 "gradient_accumulation_steps, sorted by length): leave "
                                 "mega_batch_size=None and group_by_length=True")
            mega_batch_size = self.global_batch_size * self.gradient_accumulation_steps
        elif gradient_accumulation_steps != 1:
            raise ValueError("gradient_accumulation_steps only shapes grouping='llava' "
                             "(set mega_batch_size for the default grouping)")
        if mega_batch_size is None:
            mega_batch_size = 8 * self.global_batch_size
        if check_int("mega_batch_size", mega_batch_size, 1) % self.global_batch_size:
            raise ValueError(f"mega_batch_size must be a multiple of batch_size*world_size="
                             f"{self.global_batch_size}, got {mega_batch_size}")
        if len(lengths) != len(has_image):
            raise ValueError(f"lengths and has_image must have one entry per dataset sample, got "
                             f"{len(lengths)} and {len(has_image)}")
        largest = max(mixture.text_indices + mixture.image_indices, default=-1)
        if largest >= len(lengths):
            raise ValueError(f"lengths must cover every mixture index (max {largest}), "
                             f"got {len(lengths)} entries")
        self.mixture = mixture
        self.lengths = [int(length) for length in lengths]
        self.has_image = [bool(flag) for flag in has_image]
        if grouping == "llava" and any(self.lengths[i] < 1 for i in mixture.text_indices + mixture.image_indices):
            raise ValueError("grouping='llava' needs every length >= 1 (LLaVA signs lengths by modality)")
        self.mega_batch_size = mega_batch_size
        if drop_last is not None and not isinstance(drop_last, bool):
            raise ValueError(f"drop_last must be None, True or False, got {drop_last!r}")
        self.drop_last = (grouping == "modality") if drop_last is None else drop_last
        self.seed = check_int("seed", seed)
        self.group_by_length = bool(group_by_length)

    def _keeps(self, size: int) -> bool:
        """Whether a global batch of `size` samples is kept (grouping="modality"; the llava
        grouping tops its last batch up instead, see _llava_batches)."""
        return size == self.global_batch_size or (not self.drop_last and size >= self.world_size)

    def _modality_batches(self, indices: list[int]) -> list[list[int]]:
        """Global batches of one modality's indices (mega-batch, sort, cut)."""
        batches = []
        for start in range(0, len(indices), self.mega_batch_size):
            mega = indices[start:start + self.mega_batch_size]
            if self.group_by_length:
                mega = sorted(mega, key=lambda i: -self.lengths[i])      # stable: ties stay random
            batches += [mega[i:i + self.global_batch_size]
                        for i in range(0, len(mega), self.global_batch_size)]
        return [batch for batch in batches if self._keeps(len(batch))]

    def llava_stream(self, epoch: int) -> list[int]:
        """grouping="llava": the epoch's dataset indices in LLaVA's order (before cutting)."""
        subset = sorted(self.mixture.epoch_indices(epoch))
        signed = [self.lengths[i] if self.has_image[i] else -self.lengths[i] for i in subset]
        order = modality_length_grouped_indices(
            signed, self.batch_size, self.world_size * self.gradient_accumulation_steps,
            generator=epoch_generator(self.seed, epoch))
        return [subset[position] for position in order]

    def _llava_batches(self, epoch: int) -> list[list[int]]:
        stream = self.llava_stream(epoch)
        size = self.global_batch_size
        batches = [stream[i:i + size] for i in range(0, len(stream), size)]
        if batches and len(batches[-1]) < size:
            if self.drop_last:
                batches.pop()
            else:                                   # accelerate's even_batches: wrap around
                missing = size - len(batches[-1])
                batches[-1] = batches[-1] + (stream * (missing // len(stream) + 1))[:missing]
        return batches

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every global batch of `epoch` (all ranks' samples), in yield order."""
        if self.grouping == "llava":
            return self._llava_batches(epoch)
        indices = self.mixture.epoch_indices(epoch)
        text = [i for i in indices if not self.has_image[i]]
        image = [i for i in indices if self.has_image[i]]
        batches = self._modality_batches(text) + self._modality_batches(image)
        order = torch.randperm(len(batches), generator=epoch_generator(self.seed, epoch))
        return [batches[i] for i in order.tolist()]

    def rank_batch(self, global_batch: Sequence[int], rank: Optional[int] = None) -> list[int]:
        """Rank's share of a global batch: batch_size samples, or an even split of a short one."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(len(global_batch), self.world_size)
        start = rank * base + min(rank, extra)
        return list(global_batch[start:start + base + (rank < extra)])

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in yield order (pure: no state change)."""
        return [self.rank_batch(batch) for batch in self.global_batches(epoch)]

    def _epoch_items(self, epoch: int) -> list[list[int]]:
        return self.rank_batches(epoch)

    def __len__(self) -> int:
        """Batches per rank per epoch (the same every epoch)."""
        if self.grouping == "llava":
            full, rest = divmod(self.mixture.num_samples, self.global_batch_size)
            return full + (rest > 0 and not self.drop_last)
        total = 0
        for count in self.mixture.counts.values():
            full, rest = divmod(count, self.global_batch_size)
            total += full + (rest > 0 and self._keeps(rest))
        return total

    def padding_ratio(self, batches: Optional[Sequence[Sequence[int]]] = None) -> float:
        """Padded text positions / all positions when each batch is right-padded to its longest
        sample. batches: default this rank's batches of the current epoch."""
        if batches is None:
            batches = self.rank_batches(self.epoch)
        total = padded = 0
        for batch in batches:
            batch_lengths = [self.lengths[i] for i in batch]
            positions = max(batch_lengths, default=0) * len(batch_lengths)
            total += positions
            padded += positions - sum(batch_lengths)
        return padded / total if total else 0.0

    def mixed_batch_count(self, epoch: Optional[int] = None) -> int:
        """Global batches of `epoch` (default: the current one) holding both modalities."""
        batches = self.global_batches(self.epoch if epoch is None else epoch)
        return sum(len({self.has_image[i] for i in batch}) > 1 for batch in batches)

