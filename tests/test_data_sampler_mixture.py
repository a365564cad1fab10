"""MixtureSampler: exact per-epoch counts, no repeats, determinism for (seed, epoch), exact
mid-epoch resume, and errors that name the argument."""
import pytest

from mlan_kernels.data import MixtureSampler

TEXT = list(range(0, 64))               # dataset indices of text-only samples
IMAGE = list(range(100, 164))           # dataset indices of image-text samples


def split(indices):
    return [i for i in indices if i in TEXT], [i for i in indices if i in IMAGE]


@pytest.mark.parametrize("share, text_count", [(0, 0), (0.125, 8), (0.5, 32), (0.875, 56),
                                               (1, 64)])
def test_exact_counts_without_repeats(share, text_count):
    sampler = MixtureSampler(TEXT, IMAGE, share, num_samples=64, seed=3)
    indices = list(sampler)
    text, image = split(indices)
    assert (len(text), len(image)) == (text_count, 64 - text_count)
    assert sampler.counts == {"text": text_count, "image": 64 - text_count}
    assert len(indices) == len(sampler) == 64 and len(set(indices)) == 64


def test_default_num_samples_is_the_largest_that_fits():
    assert len(MixtureSampler(TEXT, IMAGE, 0.5)) == 128                  # all the data
    assert MixtureSampler(TEXT, IMAGE, 0.875).counts == {"text": 64, "image": 9}
    assert MixtureSampler([], IMAGE, 0.0).counts == {"text": 0, "image": 64}
    assert MixtureSampler(TEXT, [], 1.0).counts == {"text": 64, "image": 0}


def test_replacement_allows_more_than_exists():
    sampler = MixtureSampler(TEXT[:4], IMAGE[:4], 0.25, num_samples=40, replacement=True)
    text, image = split(list(sampler))
    assert (len(text), len(image)) == (10, 30)
    assert set(text) <= set(TEXT[:4]) and set(image) <= set(IMAGE[:4])


def test_deterministic_for_seed_and_epoch():
    first, second = (MixtureSampler(TEXT, IMAGE, 0.5, num_samples=32, seed=7) for _ in range(2))
    assert first.epoch_indices(2) == second.epoch_indices(2)
    assert first.epoch_indices(2) != first.epoch_indices(3)
    assert first.epoch_indices(2) != MixtureSampler(TEXT, IMAGE, 0.5, 32, seed=8).epoch_indices(2)
    first.set_epoch(2)
    assert list(first) == second.epoch_indices(2)
    assert first.state_dict() == {"epoch": 3, "position": 0}          # finished: next epoch
    assert list(first) == second.epoch_indices(3)


def test_resume_mid_epoch_equals_uninterrupted():
    reference = MixtureSampler(TEXT, IMAGE, 0.875, num_samples=48, seed=1)
    expected = [reference.epoch_indices(epoch) for epoch in range(3)]

    interrupted = MixtureSampler(TEXT, IMAGE, 0.875, num_samples=48, seed=1)
    seen = [list(interrupted)]                                         # epoch 0
    interrupted.set_epoch(1)
    iterator = iter(interrupted)
    seen.append([next(iterator) for _ in range(17)])
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "position": 17}

    resumed = MixtureSampler(TEXT, IMAGE, 0.875, num_samples=48, seed=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)                                # the usual loop: same epoch keeps place
    seen[1] += list(resumed)
    resumed.set_epoch(2)
    seen.append(list(resumed))
    assert seen == expected


@pytest.mark.parametrize("args, kwargs, message", [
    ((TEXT, IMAGE, 1.5), {}, "language_share"),
    ((TEXT, IMAGE, -0.1), {}, "language_share"),
    ((TEXT, IMAGE, 0.5), {"num_samples": 200}, "num_samples=200"),
    ((TEXT, IMAGE, 0.5), {"num_samples": 0}, "num_samples"),
    (([], IMAGE, 0.5), {}, "text_indices is empty"),
    ((TEXT, [], 0.5), {"replacement": True}, "image_indices is empty"),
])
def test_errors_name_the_argument(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixtureSampler(*args, **kwargs)


def test_bad_state_is_named():
    sampler = MixtureSampler(TEXT, IMAGE, 0.5, num_samples=10)
    with pytest.raises(ValueError, match=r'state\["position"\]'):
        sampler.load_state_dict({"epoch": 0, "position": 11})
    with pytest.raises(ValueError, match=r'state\["epoch"\]'):
        sampler.load_state_dict({"position": 1})
