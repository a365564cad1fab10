"""ModalityLengthBatchSampler(drop_last=False) as a user sees it: with every modality's leftover
at least world_size samples, the ranks together train on every sample of the epoch exactly once,
and each rank takes the same number of steps (len() agrees with what it yields)."""
import pytest

from mlan_kernels.data import MixtureSampler, ModalityLengthBatchSampler

WORLD_SIZE, BATCH_SIZE = 2, 3                     # global batch: 6 samples
HAS_IMAGE = [i >= 20 for i in range(40)]
LENGTHS = [5 + (7 * i) % 11 for i in range(40)]


def rank_samplers(per_modality, drop_last):
    """One sampler per rank over a 50/50 mixture of `per_modality` text and image samples."""
    mixture = MixtureSampler(list(range(20)), list(range(20, 40)), 0.5,
                             num_samples=2 * per_modality, seed=1)
    return [ModalityLengthBatchSampler(mixture, LENGTHS, HAS_IMAGE, BATCH_SIZE, WORLD_SIZE, rank,
                                       drop_last=drop_last, seed=2) for rank in range(WORLD_SIZE)]


# leftovers after the full global batches: exactly world_size, world_size + 1, a full batch - 1
@pytest.mark.parametrize("per_modality", [6 + WORLD_SIZE, 6 + WORLD_SIZE + 1, 6 + 5])
def test_keeping_the_last_batch_trains_on_every_sample_once(per_modality):
    samplers = rank_samplers(per_modality, drop_last=False)
    shards = [list(sampler) for sampler in samplers]
    assert all(len(batches) == len(sampler) for batches, sampler in zip(shards, samplers))
    assert len({len(batches) for batches in shards}) == 1         # every rank steps together
    trained = sorted(i for batches in shards for batch in batches for i in batch)
    assert trained == sorted(samplers[0].mixture.epoch_indices(0))
    for step in zip(*shards):                                     # a step never mixes modalities
        assert all(batch for batch in step)
        assert len({HAS_IMAGE[i] for batch in step for i in batch}) == 1


def test_a_leftover_smaller_than_the_world_is_dropped_and_full_batches_only_with_drop_last():
    for per_modality, drop_last in ((6 + WORLD_SIZE - 1, False), (6 + WORLD_SIZE, True)):
        samplers = rank_samplers(per_modality, drop_last)
        shards = [list(sampler) for sampler in samplers]
        assert [len(batches) for batches in shards] == [2, 2]     # one full batch per modality
        assert all(len(batch) == BATCH_SIZE for batches in shards for batch in batches)
