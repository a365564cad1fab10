"""MLAN's batching as its code does it: LLaVA's `group_by_modality_length` order
(llava/train/llava_trainer.py, get_modality_length_grouped_indices and its helpers), written
here from that description; ModalityLengthBatchSampler(grouping="llava") uses it.

Input: one signed length per sample, > 0 for image-text samples, < 0 for text-only ones (LLaVA
uses word counts; zero is not allowed because the sign carries the modality).
    1. per modality (images first, then text): a random permutation, cut into mega-batches of
       world_size·batch_size (LLaVA's trainer passes world_size = ranks × grad-accum steps, so a
       mega-batch is one optimizer step's global batch); each mega-batch sorted by length,
       longest first, then dealt into world_size chunks of equal count whose length sums are
       balanced (greedy: next sample to the lightest chunk not yet full); a mega-batch whose
       size does not divide evenly is dealt round-robin instead;
    2. the last mega-batch of each modality (full or not) is set aside; the others are shuffled
       together; the two set-aside ones are joined, sorted by dataset index (not length), and
       appended as one final mixed-modality stretch. Nothing is dropped.
    All draws use `generator`; None means torch's global RNG, exactly as LLaVA (which also
    passes None for the per-modality permutations).
A single-modality input skips step 2: it is step 1 on the signed lengths as given (so an
all-text input sorts by negative length, as LLaVA does).
"""
from typing import Optional, Sequence

import torch


def balanced_chunks(indices: Sequence[int], lengths: Sequence[int], chunks: int) -> list[list[int]]:
    """Deal `indices` (in order) into `chunks` lists of equal count with balanced length sums;
    round-robin when the count is not a multiple of `chunks`."""
    if len(indices) % chunks:
        return [list(indices[chunk::chunks]) for chunk in range(chunks)]
    capacity = len(indices) // chunks
    dealt = [[] for _ in range(chunks)]
    load = [0.0] * chunks
    for index in indices:
        lightest = min(range(chunks), key=load.__getitem__)      # first lightest, full ones are inf
        dealt[lightest].append(index)
        load[lightest] = float("inf") if len(dealt[lightest]) == capacity else load[lightest] + lengths[index]
    return dealt


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                           generator: Optional[torch.Generator] = None) -> list[int]:
    """Step 1 above for one list of lengths -> a permutation of range(len(lengths))."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = world_size * batch_size
    out = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: lengths[i], reverse=True)
        for chunk in balanced_chunks(group, lengths, world_size):
            out.extend(chunk)
    return out


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                    generator: Optional[torch.Generator] = None) -> list[int]:
    """LLaVA/MLAN's order of all samples (see the module docstring) -> a permutation of
    range(len(lengths)). lengths: signed ints (> 0 image-text, < 0 text-only)."""
    if any(length == 0 for length in lengths):
        raise ValueError("lengths must be non-zero (> 0 image-text, < 0 text-only)")
    image = [i for i, length in enumerate(lengths) if length > 0]
    text = [i for i, length in enumerate(lengths) if length < 0]
    if not image or not text:
        return length_grouped_indices(lengths, batch_size, world_size, generator)
    mega = world_size * batch_size
    stretches = []
    for members in (image, text):
        sizes = [abs(lengths[i]) for i in members]
        order = [members[i] for i in length_grouped_indices(sizes, batch_size, world_size, generator)]
        stretches.append([order[i:i + mega] for i in range(0, len(order), mega)])
    leftover = stretches[0][-1] + stretches[1][-1]
    kept = stretches[0][:-1] + stretches[1][:-1]
    shuffled = [kept[i] for i in torch.randperm(len(kept), generator=generator).tolist()]
    return [i for stretch in shuffled + [sorted(leftover)] for i in stretch]
