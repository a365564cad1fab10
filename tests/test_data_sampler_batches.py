"""ModalityLengthBatchSampler: single-modality global batches, disjoint rank shards, the same
modality on every rank at each step, less padding with length grouping, exact resume."""
import random

import pytest

from mlan_kernels.data import MixtureSampler, ModalityLengthBatchSampler

SIZE = 200
HAS_IMAGE = [i % 3 == 0 for i in range(SIZE)]
LENGTHS = [random.Random(i).randint(4, 80) for i in range(SIZE)]
TEXT = [i for i in range(SIZE) if not HAS_IMAGE[i]]
IMAGE = [i for i in range(SIZE) if HAS_IMAGE[i]]


def make(rank=0, world_size=3, batch_size=4, share=0.5, num_samples=120, **kwargs):
    mixture = MixtureSampler(TEXT, IMAGE, share, num_samples=num_samples, seed=5)
    return ModalityLengthBatchSampler(mixture, LENGTHS, HAS_IMAGE, batch_size, world_size, rank,
                                      seed=9, **kwargs)


def test_global_batches_are_single_modality_and_drawn_from_the_mixture():
    sampler = make()
    batches = sampler.global_batches(0)
    assert len(batches) == len(sampler) == 10                  # 60 + 60 samples, 12 per batch
    assert all(len({HAS_IMAGE[i] for i in batch}) == 1 for batch in batches)
    assert all(len(batch) == 12 for batch in batches)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == sorted(sampler.mixture.epoch_indices(0))


def test_ranks_get_disjoint_shards_of_each_global_batch_with_the_same_modality():
    ranks = [make(rank=r) for r in range(3)]
    steps = list(zip(*(list(sampler) for sampler in ranks)))
    assert len(steps) == len(ranks[0])
    for shards, global_batch in zip(steps, ranks[0].global_batches(0)):
        assert all(len(shard) == 4 for shard in shards)
        assert [i for shard in shards for i in shard] == global_batch
        assert len({HAS_IMAGE[i] for shard in shards for i in shard}) == 1


def test_incomplete_last_batch_dropped_or_split_evenly():
    # 0.5 * 110: 55 per modality = 4 full global batches of 12 + 7 left over per modality
    assert len(make(num_samples=110)) == 8
    keep = make(num_samples=110, drop_last=False)
    assert len(keep) == 10
    sizes = sorted(len(batch) for batch in keep.global_batches(0))
    assert sizes == [7, 7] + [12] * 8
    short = next(batch for batch in keep.global_batches(0) if len(batch) == 7)
    shards = [keep.rank_batch(short, rank) for rank in range(3)]
    assert [len(shard) for shard in shards] == [3, 2, 2] and sum(shards, []) == short
    # 2 left over per modality: fewer than 3 ranks, dropped even with drop_last=False
    assert len(make(num_samples=100, drop_last=False)) == 8


def test_length_grouping_sorts_and_cuts_padding():
    grouped, random_batches = make(), make(group_by_length=False)
    for batch in grouped.global_batches(0):
        assert [LENGTHS[i] for i in batch] == sorted((LENGTHS[i] for i in batch), reverse=True)
    assert sorted(map(sorted, grouped.global_batches(0))) != sorted(
        map(sorted, random_batches.global_batches(0)))
    assert grouped.padding_ratio() < 0.5 * random_batches.padding_ratio()


def test_padding_ratio_of_given_batches():
    sampler = make()
    first, second = next(i for i in range(SIZE) if LENGTHS[i] == 80), LENGTHS.index(4)
    assert sampler.padding_ratio([[first, second]]) == pytest.approx(76 / 160)
    assert sampler.padding_ratio([[first]]) == 0.0


def test_deterministic_per_epoch_and_resume_mid_epoch():
    reference = make(rank=1)
    expected = reference.rank_batches(0) + reference.rank_batches(1)
    assert reference.rank_batches(0) != reference.rank_batches(1)

    interrupted = make(rank=1)
    iterator = iter(interrupted)
    seen = [next(iterator) for _ in range(3)]
    resumed = make(rank=1)
    resumed.load_state_dict(interrupted.state_dict())
    for epoch in (0, 1):
        resumed.set_epoch(epoch)
        seen += list(resumed)
    assert seen == expected


@pytest.mark.parametrize("kwargs, name", [({"rank": 3}, "rank"), ({"batch_size": 0}, "batch_size"),
                                          ({"mega_batch_size": 18}, "mega_batch_size")])
def test_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make(**kwargs)


def test_lengths_must_cover_the_dataset():
    mixture = MixtureSampler(TEXT, IMAGE, 0.5)
    with pytest.raises(ValueError, match="lengths"):
        ModalityLengthBatchSampler(mixture, LENGTHS[:50], HAS_IMAGE[:50], batch_size=2)
