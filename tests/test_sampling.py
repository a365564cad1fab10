"""Next-token sampling (integrations/sampling.py) and LavinModel.generate with it: greedy at
temperature 0, the nucleus rule and its frequencies, reproducibility, argument errors."""
import pytest
import torch

from mlan_kernels.integrations.sampling import check_sampling_args, next_tokens

from test_integration_lavin import PIXELS, tiny_lavin
from test_integration_llama import token_ids

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def draw(logits, count, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    rows = logits.expand(count, -1)
    return next_tokens(rows, generator=generator, **kwargs)


def frequencies(tokens, vocab):
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(next_tokens(logits), logits.argmax(-1))


def test_nucleus_keeps_the_tokens_whose_preceding_mass_is_at_most_top_p():
    # mass before each sorted token: 0, 0.5, 0.8, 0.95 -> top_p 0.7 keeps tokens 0 and 1
    got = frequencies(draw(PROBS.log(), 20000, temperature=1.0, top_p=0.7), 4)
    torch.testing.assert_close(got, torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=torch.float64),
                               rtol=0, atol=0.015)
    assert got[2] == 0 and got[3] == 0


def test_temperature_scales_the_logits():
    logits = PROBS.log()
    got = frequencies(draw(logits, 20000, temperature=2.0), 4)
    torch.testing.assert_close(got, torch.softmax(logits / 2.0, -1).double(), rtol=0, atol=0.015)


def test_tiny_top_p_is_greedy_and_draws_are_reproducible():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draw(logits[:1], 1, temperature=1.0, top_p=1e-9), logits[:1].argmax(-1))
    first = next_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(first, next_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("temperature, top_p, message", [
    (-0.1, 1.0, "temperature must be"), (float("nan"), 1.0, "temperature must be"),
    (1.0, 0.0, r"top_p must be in \(0, 1\]"), (1.0, 1.5, r"top_p must be in \(0, 1\]")])
def test_bad_arguments_name_the_argument(temperature, top_p, message):
    with pytest.raises(ValueError, match=message):
        check_sampling_args(temperature, top_p)
    with pytest.raises(ValueError, match=message):
        tiny_lavin().generate(token_ids(batch=1, length=4), PIXELS[:1], [True],
                              temperature=temperature, top_p=top_p)


@pytest.mark.parametrize("use_cache", [True, False])
def test_lavin_generate_samples_reproducibly(use_cache):
    model, ids = tiny_lavin(), token_ids(batch=2, length=4)
    def sample(seed, **kwargs):
        return model.generate(ids, PIXELS[:2], [True, True], max_new_tokens=6, use_cache=use_cache,
                              temperature=1.5, generator=torch.Generator().manual_seed(seed), **kwargs)
    first = sample(0)
    assert torch.equal(first, sample(0))
    assert any(not torch.equal(first, sample(seed)) for seed in range(1, 6))   # it does sample
    greedy = model.generate(ids, PIXELS[:2], [True, True], max_new_tokens=6, use_cache=use_cache)
    assert torch.equal(sample(7, top_p=1e-9), greedy)


def test_cache_and_recompute_sample_the_same_tokens():
    model, ids = tiny_lavin(), token_ids(batch=1, length=4)
    cached, recomputed = (model.generate(ids, None, [False], max_new_tokens=6, use_cache=use_cache,
                                         temperature=1.0, top_p=0.9,
                                         generator=torch.Generator().manual_seed(5))
                          for use_cache in (True, False))
    assert torch.equal(cached, recomputed)
