"""MLAN's batching (grouping="llava") against an independent implementation of LLaVA's
`get_modality_length_grouped_indices`, and MixtureSampler(resample_each_epoch=False).

The reference below is written from haotian-liu/LLaVA llava/train/llava_trainer.py (commit on
main as fetched): split_to_even_chunks lines 38-57, get_modality_length_grouped_indices lines
60-85, get_length_grouped_indices lines 88-96; LLaVATrainer._get_train_sampler lines 139-146
passes world_size = world_size × gradient_accumulation_steps and no generator (global RNG).
HF Trainer + accelerate (BatchSamplerShard, even_batches) give consecutive per-device batches
to ranks 0..W-1 and top an incomplete last round up with the epoch's first samples.
"""
import random

import pytest
import torch

from mlan_kernels.data import MixtureSampler, ModalityLengthBatchSampler
from mlan_kernels.data.epoch_state import SEED_STRIDE
from mlan_kernels.data.llava_grouping import modality_length_grouped_indices


# --- reference (LLaVA's algorithm, global torch RNG) ---------------------------------------
def ref_even_chunks(indices, lengths, n):
    if len(indices) % n != 0:
        return [indices[i::n] for i in range(n)]
    per_chunk = len(indices) // n
    chunks, sums = [[] for _ in range(n)], [0 for _ in range(n)]
    for index in indices:
        shortest = sums.index(min(sums))
        chunks[shortest].append(index)
        sums[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            sums[shortest] = float("inf")
    return chunks


def ref_length_grouped(lengths, batch_size, world_size):
    indices = torch.randperm(len(lengths))
    size = world_size * batch_size
    megabatches = [indices[i:i + size].tolist() for i in range(0, len(lengths), size)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    megabatches = [ref_even_chunks(m, lengths, world_size) for m in megabatches]
    return [i for m in megabatches for chunk in m for i in chunk]


def ref_modality_grouped(lengths, batch_size, world_size):
    if all(l > 0 for l in lengths) or all(l < 0 for l in lengths):
        return ref_length_grouped(lengths, batch_size, world_size)
    mm = [(i, l) for i, l in enumerate(lengths) if l > 0]
    lang = [(i, -l) for i, l in enumerate(lengths) if l < 0]
    mm_order = [mm[i][0] for i in ref_length_grouped([l for _, l in mm], batch_size, world_size)]
    lang_order = [lang[i][0] for i in ref_length_grouped([l for _, l in lang], batch_size, world_size)]
    size = world_size * batch_size
    mm_mega = [mm_order[i:i + size] for i in range(0, len(mm_order), size)]
    lang_mega = [lang_order[i:i + size] for i in range(0, len(lang_order), size)]
    additional = mm_mega[-1] + lang_mega[-1]
    megabatches = mm_mega[:-1] + lang_mega[:-1]
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches))]
    if additional:
        megabatches.append(sorted(additional))
    return [i for m in megabatches for i in m]


def signed_lengths(count, image_share, seed, longest=300):
    rng = random.Random(seed)
    return [rng.randint(1, longest) * (1 if rng.random() < image_share else -1) for _ in range(count)]


@pytest.mark.parametrize("count,image_share,batch,world", [
    (800, 0.125, 8, 8), (333, 0.5, 4, 3), (50, 0.9, 2, 4), (64, 0.0, 4, 2), (64, 1.0, 4, 2),
    (7, 0.5, 4, 4)])
def test_function_matches_llava(count, image_share, batch, world):
    lengths = signed_lengths(count, image_share, seed=count)
    lengths[:10] = [5 if l > 0 else -5 for l in lengths[:10]]           # ties keep LLaVA's order
    torch.manual_seed(11)
    expected = ref_modality_grouped(lengths, batch, world)
    torch.manual_seed(11)
    assert modality_length_grouped_indices(lengths, batch, world) == expected
    assert sorted(expected) == list(range(count))                        # nothing dropped
    generator = torch.Generator().manual_seed(11)
    assert modality_length_grouped_indices(lengths, batch, world, generator) == expected


def llava_sampler(lengths, batch, world, rank=0, accum=1, share=None, seed=3, **kwargs):
    has_image = [l > 0 for l in lengths]
    text = [i for i, flag in enumerate(has_image) if not flag]
    image = [i for i, flag in enumerate(has_image) if flag]
    share = len(text) / len(lengths) if share is None else share
    mixture = MixtureSampler(text, image, share, seed=seed, **kwargs)
    return ModalityLengthBatchSampler(mixture, [abs(l) for l in lengths], has_image, batch, world,
                                      rank, seed=seed, grouping="llava",
                                      gradient_accumulation_steps=accum)


@pytest.mark.parametrize("accum", [1, 2])
def test_sampler_reproduces_llava_stream_and_accelerate_sharding(accum):
    lengths = signed_lengths(203, 0.3, seed=4)
    batch, world = 4, 3
    for epoch in (0, 1):
        torch.manual_seed(3 * SEED_STRIDE + epoch)
        expected = ref_modality_grouped(lengths, batch, world * accum)
        samplers = [llava_sampler(lengths, batch, world, rank, accum) for rank in range(world)]
        assert samplers[0].llava_stream(epoch) == expected
        batches = samplers[0].global_batches(epoch)
        size = batch * world
        assert len(batches) == len(samplers[0]) == -(-203 // size)
        flat = [i for b in batches for i in b]
        assert flat[:203] == expected and flat[203:] == expected[:len(flat) - 203]
        for rank, sampler in enumerate(samplers):
            sampler.set_epoch(epoch)
            mine = list(sampler)
            assert mine == [expected_slice(flat, g * size + rank * batch, batch) for g in range(len(batches))]


def expected_slice(flat, start, count):
    return flat[start:start + count]


def test_last_megabatches_merge_into_one_mixed_stretch_as_measured_in_the_issue():
    lengths = signed_lengths(700, 0.0, seed=1) + signed_lengths(100, 1.0, seed=2)   # text first
    sampler = llava_sampler(lengths, batch=8, world=8)
    batches = sampler.global_batches(0)
    assert len(batches) == len(sampler) == 13
    flat = [i for b in batches for i in b]
    assert sorted(flat[:800]) == list(range(800)) and flat[800:] == flat[:32]   # none dropped
    assert sampler.mixed_batch_count(0) == 2                             # 60 text + 36 image
    tail = flat[704:800]
    assert tail == sorted(tail)                                          # sorted by index
    assert sum(i >= 700 for i in tail) == 36


def test_subset_of_a_mixture_and_drop_last():
    lengths = signed_lengths(300, 0.5, seed=5)
    sampler = llava_sampler(lengths, batch=4, world=2, share=0.75, num_samples=100)
    subset = sampler.mixture.epoch_indices(0)
    assert sorted(sampler.llava_stream(0)) == sorted(subset)
    dropping = llava_sampler(lengths, batch=4, world=2, share=0.75, num_samples=100)
    dropping.drop_last = True
    assert len(dropping) == 12 and len(dropping.global_batches(0)) == 12
    assert len(sampler) == 13 and len(sampler.global_batches(0)[-1]) == 8


def test_our_grouping_is_the_default_and_never_mixes():
    lengths = signed_lengths(800, 0.125, seed=6)
    has_image = [l > 0 for l in lengths]
    text = [i for i, f in enumerate(has_image) if not f]
    image = [i for i, f in enumerate(has_image) if f]
    mixture = MixtureSampler(text, image, len(text) / 800)
    ours = ModalityLengthBatchSampler(mixture, [abs(l) for l in lengths], has_image, 8, 8)
    assert ours.grouping == "modality" and ours.drop_last and ours.mixed_batch_count(0) == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(grouping="mlan"), "grouping must be one of"),
    (dict(grouping="llava", mega_batch_size=64), "fixes the mega-batch"),
    (dict(grouping="llava", group_by_length=False), "fixes the mega-batch"),
    (dict(gradient_accumulation_steps=2), "only shapes grouping='llava'"),
    (dict(grouping="llava", gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (dict(drop_last="yes"), "drop_last must be None, True or False"),
])
def test_argument_errors(kwargs, message):
    mixture = MixtureSampler([0, 1], [2, 3], 0.5)
    with pytest.raises(ValueError, match=message):
        ModalityLengthBatchSampler(mixture, [3, 4, 5, 6], [False, False, True, True], 2, **kwargs)
    with pytest.raises(ValueError, match="every length >= 1"):
        ModalityLengthBatchSampler(mixture, [0, 4, 5, 6], [False, False, True, True], 2,
                                   grouping="llava")


@pytest.mark.parametrize("replacement", [False, True])
def test_fixed_mixture_draws_the_subset_once(replacement):
    text, image = list(range(100)), list(range(100, 150))
    fixed = MixtureSampler(text, image, 0.875, num_samples=40, seed=2, replacement=replacement,
                           resample_each_epoch=False)
    redrawn = MixtureSampler(text, image, 0.875, num_samples=40, seed=2, replacement=replacement)
    subsets = [sorted(fixed.epoch_indices(epoch)) for epoch in range(4)]
    assert all(subset == subsets[0] for subset in subsets)
    assert fixed.epoch_indices(0) != fixed.epoch_indices(1)                # order still reshuffled
    assert len({tuple(sorted(redrawn.epoch_indices(epoch))) for epoch in range(4)}) == 4
    assert sum(i < 100 for i in subsets[0]) == 35
    with pytest.raises(ValueError, match="resample_each_epoch must be True or False"):
        MixtureSampler(text, image, 0.5, resample_each_epoch="no")


def test_documented_grouping_table_is_what_the_script_measures():
    import argparse
    import importlib.util
    import os
    root = os.path.join(os.path.dirname(__file__), "..")
    spec = importlib.util.spec_from_file_location(
        "sampler_grouping", os.path.join(root, "benchmarks", "sampler_grouping.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    lines = script.table(argparse.Namespace(world=8, batch=8, accum=1, share=0.875))
    with open(os.path.join(root, "docs", "mlan_mixtures.md"), encoding="utf-8") as handle:
        page = handle.read()
    assert all(f"  {line}\n" in page for line in lines), lines
