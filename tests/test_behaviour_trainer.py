"""What a `mlan-train` user gets from one optimizer step (MixedTrainer.train_step):

* gradient accumulation: grad_accum=2 at batch b gives the gradients and loss of one batch 2b
  holding the same samples (micro-batches of equal answer-token counts, so token means agree);
* per-side clipping: after clipping every side's gradient norm is ≤ --max-grad-norm (a side above
  it lands on it); --max-grad-norm 0 leaves the gradients as computed;
* CoMMIT balancing: with --balance-alpha α > 0 the per-side learning rates follow the κ̂ of the
  probes, lr_side = initial_lr · schedule(step) · clip(κ̂^(∓α)); with α = 0 both sides share it;
  probes run every --probe-every steps from --probe-start, by default the end of warm-up.
"""
import collections

import pytest
import torch

from mlan_kernels.data.collate import TokenCounter
from mlan_kernels.data.dataset import IGNORE_INDEX
from mlan_kernels.data.synthetic import make_synthetic
from mlan_kernels.training.balance import FEATURE, LANGUAGE
from mlan_train.config import build_parser, config_from_args
from mlan_train.trainer import MixedTrainer
from mlan_kernels.training.scheduler import GROUP_KEY

TINY = ["--dim", "32", "--layers", "1", "--heads", "2", "--clip-dim", "32", "--clip-layers", "4",
        "--batch-size", "4", "--warmup-steps", "1", "--no-progress", "--steps", "10",
        "--no-plots", "--language-share", "0.5", "--adapter-dropout", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    make_synthetic(directory, train_size=96, eval_size=8, seed=3)
    return str(directory)


def make_trainer(data, out, *options):
    return MixedTrainer(config_from_args(build_parser().parse_args(
        ["--data", data, "--out", str(out), *TINY, *options])))


def grads_at_optimizer_step(trainer):
    """A list that receives {parameter name: grad} each time the optimizer steps."""
    captured = []
    names = {id(p): name for name, p in trainer.module.named_parameters()}

    def hook(optimizer, args, kwargs):
        captured.append({names[id(p)]: p.grad.detach().clone() for group in optimizer.param_groups
                         for p in group["params"] if p.grad is not None})
    trainer.optimizer.register_step_pre_hook(hook)
    return captured


def equal_answer_samples(trainer, modality, count):
    """`count` training samples of one modality with the same number of answer tokens."""
    groups = collections.defaultdict(list)
    for index in range(len(trainer.train_set)):
        sample = trainer.train_set[index]
        if sample["has_image"] == (modality == "image"):
            groups[int((sample["labels"] != IGNORE_INDEX).sum())].append(index)
    chosen = max(groups.values(), key=len)
    assert len(chosen) >= count, "the synthetic set has too few equal-length answers"
    return chosen[:count]


@pytest.mark.parametrize("modality", ["text", "image"])
def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(data, tmp_path, modality):
    options = ("--max-grad-norm", "0", "--probe-every", "0")
    accumulated = make_trainer(data, tmp_path / "a", *options, "--grad-accum", "2", "--batch-size", "2")
    whole = make_trainer(data, tmp_path / "b", *options, "--grad-accum", "1", "--batch-size", "4")
    samples = equal_answer_samples(whole, modality, 4)
    got, expected = grads_at_optimizer_step(accumulated), grads_at_optimizer_step(whole)
    loss_accumulated, _ = accumulated.train_step(iter([samples[:2], samples[2:]]), TokenCounter())
    loss_whole, _ = whole.train_step(iter([samples]), TokenCounter())
    assert loss_accumulated == pytest.approx(loss_whole, rel=1e-5)
    assert got[0].keys() == expected[0].keys()
    for name, grad in expected[0].items():
        torch.testing.assert_close(got[0][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_max_grad_norm_zero_keeps_the_computed_gradients(data, tmp_path):
    trainer = make_trainer(data, tmp_path, "--max-grad-norm", "0", "--probe-every", "0")
    samples = equal_answer_samples(trainer, "image", 2)
    trainer._micro_step(samples, TokenCounter(), True)            # a plain backward, same weights
    computed = {name: p.grad.clone() for name, p in trainer.module.named_parameters()
                if p.grad is not None}
    captured = grads_at_optimizer_step(trainer)
    trainer.train_step(iter([samples]), TokenCounter())
    assert captured[0].keys() == computed.keys()
    for name, grad in computed.items():
        torch.testing.assert_close(captured[0][name], grad, msg=name)


def side_norms(trainer):
    return [float(torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(p.grad) for p in side if p.grad is not None])))
        for side in trainer.sides]


@pytest.mark.parametrize("max_norm", [1e-3, 0.05])
def test_after_clipping_every_side_norm_is_at_most_max_grad_norm(data, tmp_path, max_norm):
    trainer = make_trainer(data, tmp_path, "--max-grad-norm", str(max_norm), "--probe-every", "1",
                           "--probe-on", "any", "--probe-start", "0")    # a record at every step
    post_clip = []
    trainer.optimizer.register_step_pre_hook(lambda *args: post_clip.append(side_norms(trainer)))
    batches, counter, records = trainer._batches(), TokenCounter(), []
    for _ in range(4):
        _, record = trainer.train_step(batches, counter)
        trainer.step += 1
        records.append(record)
        norms = post_clip[-1]
        for before, after in zip((record["grad_norm_feat"], record["grad_norm_lang"]), norms):
            assert after <= max_norm * (1 + 1e-4)
            if before > max_norm:                           # clipped onto the bound, not below
                assert after == pytest.approx(max_norm, rel=1e-4)
            else:
                assert after == pytest.approx(before, rel=1e-4)
    assert any(r["grad_norm_feat"] > max_norm or r["grad_norm_lang"] > max_norm for r in records)


def expected_multipliers(kappa, alpha, low=0.1, high=10.0):
    """CoMMIT's per-side multipliers (our interpretation, scheduler.py), written out here."""
    return {FEATURE: min(max(kappa ** -alpha, low), high), LANGUAGE: min(max(kappa ** alpha, low), high)}


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_per_side_learning_rates_follow_the_probed_kappa(data, tmp_path, alpha):
    trainer = make_trainer(data, tmp_path, "--balance-alpha", str(alpha), "--probe-every", "1",
                           "--probe-on", "any", "--lr", "1e-2", "--probe-start", "0")
    batches, counter = trainer._batches(), TokenCounter()
    kappas = []
    for step in range(1, 5):
        _, record = trainer.train_step(batches, counter)
        trainer.step += 1
        kappa = record["kappa_ema"]
        kappas.append(kappa)
        factor = trainer.scheduler.base_schedule(step)
        multipliers = expected_multipliers(kappa, alpha)
        for group in trainer.optimizer.param_groups:
            expected = group["initial_lr"] * factor * multipliers[group[GROUP_KEY]]
            assert group["lr"] == pytest.approx(expected, rel=1e-9), (step, group[GROUP_KEY])
    assert any(abs(kappa - 1.0) > 1e-2 for kappa in kappas)  # κ̂ ≠ 1: the multipliers matter


@pytest.mark.parametrize("options, probed", [
    ([], [4, 6, 8]),                              # default: the first probe after warm-up
    (["--probe-start", "0"], [0, 2, 4, 6, 8]),
    (["--probe-start", "5"], [6, 8]),             # then on the --probe-every grid
])
def test_probes_run_on_the_probe_every_grid_from_probe_start(data, tmp_path, options, probed):
    trainer = make_trainer(data, tmp_path, "--warmup-steps", "4", "--probe-every", "2",
                           "--probe-on", "any", "--balance-alpha", "0.5", *options)
    batches, counter, steps = trainer._batches(), TokenCounter(), []
    for step in range(10):
        _, record = trainer.train_step(batches, counter)
        trainer.step += 1
        if record is not None:
            steps.append(record["step"])
        if not steps:                             # no κ̂ yet: both sides at the schedule's LR
            assert {group["lr"] for group in trainer.optimizer.param_groups} == {
                trainer.optimizer.param_groups[0]["initial_lr"] * trainer.scheduler.base_schedule(step + 1)}
    assert steps == probed


def test_probe_start_outside_the_run_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match=r"--probe-start must be in \[0, steps\), got 10"):
        make_trainer(data, tmp_path, "--probe-start", "10")


def test_micro_batches_are_padded_with_the_tokenizers_pad_id(data, tmp_path):
    """A LLaMA tokenizer's pad id need not be 0 (the tiny word tokenizer's): the trained batch
    pads with the tokenizer's own id, on the padded (masked-out) positions only."""
    trainer = make_trainer(data, tmp_path)
    trainer.tokenizer.pad_id = 3                     # this instance only
    lengths = {index: len(trainer.train_set[index]["input_ids"]) for index in range(16)}
    short, long = min(lengths, key=lengths.get), max(lengths, key=lengths.get)
    assert lengths[short] < lengths[long]
    inputs, _, _ = trainer._micro_step([short, long], TokenCounter(), last=True)
    padded = inputs["attention_mask"] == 0
    assert padded.any() and (inputs["input_ids"][padded] == 3).all()
    assert inputs["input_ids"][0, :lengths[short]].tolist() == trainer.train_set[short]["input_ids"].tolist()
