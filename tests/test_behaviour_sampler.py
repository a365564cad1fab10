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


def test_small_mega_batches_still_cover_the_epoch():
    """Several mega-batches per modality (mega_batch_size = one global batch): every sample of the
    epoch is still trained on once, and the per-rank length agrees with what is yielded."""
    mixture = MixtureSampler(list(range(20)), list(range(20, 40)), 0.5, num_samples=36, seed=1)
    samplers = [ModalityLengthBatchSampler(mixture, LENGTHS, HAS_IMAGE, BATCH_SIZE, WORLD_SIZE,
                                           rank, mega_batch_size=6, seed=2)
                for rank in range(WORLD_SIZE)]
    shards = [list(sampler) for sampler in samplers]
    assert [len(batches) for batches in shards] == [len(samplers[0])] * WORLD_SIZE == [6, 6]
    assert sorted(i for batches in shards for batch in batches for i in batch) == \
        sorted(mixture.epoch_indices(0))


def test_one_process_defaults_and_a_batch_of_one():
    """Without world_size/rank one process gets every sample, batch_size samples a step; a
    leftover of one sample is a batch of its own when kept."""
    mixture = MixtureSampler(list(range(20)), list(range(20, 40)), 0.5, num_samples=10)
    sampler = ModalityLengthBatchSampler(mixture, LENGTHS, HAS_IMAGE, 2, drop_last=False)
    batches = list(sampler)
    assert [len(batch) for batch in batches].count(2) == 4 and len(batches) == len(sampler) == 6
    assert sorted(i for batch in batches for i in batch) == sorted(mixture.epoch_indices(0))
    ones = ModalityLengthBatchSampler(mixture, LENGTHS, HAS_IMAGE, 1)
    assert len(list(ones)) == len(ones) == 10


def test_a_mixture_of_one_sample():
    assert len(MixtureSampler([7], [], 1.0)) == 1 and list(MixtureSampler([7], [], 1.0)) == [7]


def test_draws_with_replacement_are_reproducible_per_seed_and_epoch():
    def draw(seed, epoch):
        return MixtureSampler([1, 2, 3], [4, 5], 0.5, num_samples=40, seed=seed,
                              replacement=True).epoch_indices(epoch)
    assert draw(3, 0) == draw(3, 0) and draw(3, 0) != draw(3, 1) and draw(3, 0) != draw(4, 0)


def test_padding_ratio_sums_over_all_batches():
    mixture = MixtureSampler(list(range(20)), list(range(20, 40)), 0.5, num_samples=12)
    sampler = ModalityLengthBatchSampler(mixture, LENGTHS, HAS_IMAGE, 2)
    batches = [[0, 1], [2, 3, 4], [5]]
    positions = [max(LENGTHS[i] for i in b) * len(b) for b in batches]
    padded = [p - sum(LENGTHS[i] for i in b) for p, b in zip(positions, batches)]
    assert sampler.padding_ratio(batches) == pytest.approx(sum(padded) / sum(positions))
    assert sampler.padding_ratio([]) == 0.0


@pytest.mark.parametrize("kwargs, name", [
    (dict(batch_size=0), "batch_size"), (dict(world_size=0), "world_size"),
    (dict(rank=-1), "rank"), (dict(seed=-1), "seed"), (dict(mega_batch_size=0), "mega_batch_size"),
    (dict(mixture_seed=-1), "seed"), (dict(num_samples=0), "num_samples"),
    (dict(share=1.5), "language_share"),
])
def test_every_bad_argument_is_named_first_in_its_error(kwargs, name):
    mixture_args = dict(num_samples=kwargs.pop("num_samples", 12), seed=kwargs.pop("mixture_seed", 0))
    share = kwargs.pop("share", 0.5)
    with pytest.raises(ValueError, match=rf"^{name} must"):
        mixture = MixtureSampler(list(range(20)), list(range(20, 40)), share, **mixture_args)
        ModalityLengthBatchSampler(mixture, LENGTHS, HAS_IMAGE, **{"batch_size": 2, **kwargs})


@pytest.mark.parametrize("modality, share, indices", [("text", 1.0, ([0, 1], [30])),
                                                      ("image", 0.0, ([0], [30, 31]))])
def test_asking_for_more_samples_than_exist_names_the_modality(modality, share, indices):
    with pytest.raises(ValueError, match=rf"needs 3 {modality} samples, only 2 exist"):
        MixtureSampler(*indices, share, num_samples=3)


def test_lengths_must_reach_the_largest_index():
    mixture = MixtureSampler(list(range(20)), list(range(20, 40)), 0.5)
    with pytest.raises(ValueError, match="lengths must cover every mixture index"):
        ModalityLengthBatchSampler(mixture, LENGTHS[:39], HAS_IMAGE[:39], 2)
    ModalityLengthBatchSampler(mixture, LENGTHS, HAS_IMAGE, 2)             # exactly enough


def test_an_empty_batch_adds_no_positions_to_the_padding_ratio():
    mixture = MixtureSampler(list(range(20)), list(range(20, 40)), 0.5, num_samples=12)
    sampler = ModalityLengthBatchSampler(mixture, LENGTHS, HAS_IMAGE, 2)
    assert sampler.padding_ratio([[], [0, 1], []]) == sampler.padding_ratio([[0, 1]]) > 0


def test_a_mega_batch_of_one_sample():
    """batch_size 1 on one process: a mega-batch of one global batch (one sample) is allowed."""
    mixture = MixtureSampler(list(range(20)), list(range(20, 40)), 0.5, num_samples=6)
    sampler = ModalityLengthBatchSampler(mixture, LENGTHS, HAS_IMAGE, 1, mega_batch_size=1)
    assert sorted(i for batch in sampler for i in batch) == sorted(mixture.epoch_indices(0))


# --- grouping="llava" (MLAN's): whatever the leftover, len() is what an epoch yields -----------
def llava_samplers(num_samples, drop_last, accumulation=1):
    mixture = MixtureSampler(list(range(20)), list(range(20, 40)), 0.5, num_samples=num_samples,
                             seed=1)
    return [ModalityLengthBatchSampler(mixture, LENGTHS, HAS_IMAGE, BATCH_SIZE, WORLD_SIZE, rank,
                                       drop_last=drop_last, seed=2, grouping="llava",
                                       gradient_accumulation_steps=accumulation)
            for rank in range(WORLD_SIZE)]


# global batch 6: no leftover, a leftover of one sample, of five
@pytest.mark.parametrize("num_samples", [12, 13, 17])
@pytest.mark.parametrize("drop_last", [False, True])
def test_llava_grouping_yields_len_batches_and_every_sample(num_samples, drop_last):
    """Each rank yields len(sampler) full batches; with drop_last=False the ranks together
    train on every sample of the epoch (the last batch topped up with the epoch's first ones),
    with drop_last=True on every sample of the full global batches (all of them when the
    mixture is a whole number of global batches)."""
    samplers = llava_samplers(num_samples, drop_last)
    shards = [list(sampler) for sampler in samplers]
    full, rest = divmod(num_samples, WORLD_SIZE * BATCH_SIZE)
    expected = full + (rest > 0 and not drop_last)
    assert [len(batches) for batches in shards] == [len(samplers[0])] * WORLD_SIZE == \
        [expected] * WORLD_SIZE
    assert all(len(batch) == BATCH_SIZE for batches in shards for batch in batches)
    trained = {i for batches in shards for batch in batches for i in batch}
    epoch = set(samplers[0].mixture.epoch_indices(0))
    assert trained <= epoch and len(trained) == (num_samples if rest == 0 or not drop_last
                                                 else full * WORLD_SIZE * BATCH_SIZE)


def test_llava_mega_batch_is_one_optimizer_step():
    sampler = llava_samplers(12, False, accumulation=4)[0]
    assert sampler.mega_batch_size == WORLD_SIZE * BATCH_SIZE * 4


def test_mixed_batch_count_is_of_the_epoch_asked_for():
    """mixed_batch_count(epoch) counts that epoch's global batches holding both modalities;
    without an epoch, the current one (set_epoch)."""
    sampler = llava_samplers(34, False)[0]
    counts = [sum(len({HAS_IMAGE[i] for i in batch}) > 1 for batch in sampler.global_batches(epoch))
              for epoch in range(6)]
    assert len(set(counts)) > 1                   # the epochs differ, so the epoch matters
    assert [sampler.mixed_batch_count(epoch) for epoch in range(6)] == counts
    for epoch in (3, 1):
        sampler.set_epoch(epoch)
        assert sampler.mixed_batch_count() == counts[epoch]


@pytest.mark.parametrize("kwargs, lengths, message", [
    (dict(grouping="llava", mega_batch_size=6), LENGTHS,
     "grouping='llava' fixes the mega-batch (world_size·batch_size·gradient_accumulation_steps, "
     "sorted by length): leave mega_batch_size=None and group_by_length=True"),
    (dict(grouping="llava", group_by_length=False), LENGTHS,
     "grouping='llava' fixes the mega-batch (world_size·batch_size·gradient_accumulation_steps, "
     "sorted by length): leave mega_batch_size=None and group_by_length=True"),
    (dict(gradient_accumulation_steps=2), LENGTHS,
     "gradient_accumulation_steps only shapes grouping='llava' (set mega_batch_size for the "
     "default grouping)"),
    (dict(grouping="llava"), [0] + LENGTHS[1:],
     "grouping='llava' needs every length >= 1 (LLaVA signs lengths by modality)"),
    (dict(), LENGTHS[:39], "lengths and has_image must have one entry per dataset sample, got "
     "39 and 40"),
    (dict(grouping="llava", gradient_accumulation_steps=0), LENGTHS,
     "gradient_accumulation_steps must be an int >= 1, got 0"),
])
def test_grouping_errors_say_what_to_change(kwargs, lengths, message):
    mixture = MixtureSampler(list(range(20)), list(range(20, 40)), 0.5, num_samples=12)
    with pytest.raises(ValueError) as error:
        ModalityLengthBatchSampler(mixture, lengths, HAS_IMAGE, BATCH_SIZE, WORLD_SIZE, **kwargs)
    assert str(error.value) == message


def test_llava_order_refuses_a_length_without_a_sign():
    from mlan_kernels.data.llava_grouping import modality_length_grouped_indices
    with pytest.raises(ValueError, match=r"^lengths must be non-zero \(> 0 image-text, "
                                         r"< 0 text-only\)$"):
        modality_length_grouped_indices([3, -2, 0, 5], 2, 1)
