"""What a `mlan-train` user gets from one optimizer step (MixedTrainer.train_step):

* gradient accumulation: grad_accum=2 at batch b gives the gradients and loss of one batch 2b
  holding the same samples (micro-batches of equal answer-token counts, so token means agree);
* per-side clipping: after clipping every side's gradient norm is ≤ --max-grad-norm (a side above
  it lands on it); --max-grad-norm 0 leaves the gradients as computed;
* CoMMIT balancing: with --balance-alpha α > 0 the per-side learning rates follow the κ̂ of the
  probes, lr_side = initial_lr · schedule(step) · clip(κ̂^(∓α)); with α = 0 both sides share it;
  probes run every --probe-every steps from --probe-start, by default the end of warm-up.

And what it gets from the evaluation: per-task accuracies keyed by the synthetic task of each
held-out sample (read from its id), every held-out sample counted once. The run record holds
the resolved options; truncated answers are accepted up to 1 % of the records.
"""
import collections
import json
import os
import re

import pytest
import torch

from mlan_kernels.data.collate import TokenCounter
from mlan_kernels.data.dataset import IGNORE_INDEX
from mlan_kernels.data.synthetic import make_synthetic
from mlan_kernels.training.balance import FEATURE, LANGUAGE
from mlan_train.config import build_parser, config_from_args
from mlan_train.datasets import check_truncation
from mlan_train.evaluate import answer_mask
from mlan_train.trainer import MixedTrainer, NonFiniteError, task_of
from mlan_kernels.training.scheduler import GROUP_KEY

from test_train_faults import poison_gradients_at

TINY = ["--dim", "32", "--layers", "1", "--heads", "2", "--clip-dim", "32", "--clip-layers", "4",
        "--batch-size", "4", "--warmup-steps", "1", "--no-progress", "--steps", "10",
        "--no-plots", "--language-share", "0.5", "--adapter-dropout", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    make_synthetic(directory, train_size=96, eval_size=8, seed=3)
    return str(directory)


def make_trainer(data, out, *options, rank=0, world_size=1):
    return MixedTrainer(config_from_args(build_parser().parse_args(
        ["--data", data, "--out", str(out), *TINY, *options])), rank, world_size)


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


def recording_micro_steps(trainer):
    """A list that receives (loss, has_image) of every micro-batch trainer trains."""
    seen, micro_step = [], trainer._micro_step

    def recording(*args, **kwargs):
        inputs, out, image_batch = micro_step(*args, **kwargs)
        seen.append((float(out.loss.detach()), image_batch))
        return inputs, out, image_batch
    trainer._micro_step = recording
    return seen


def test_the_step_reports_its_loss_and_multipliers_and_logs_the_language_lr(data, tmp_path):
    """train_step's loss = the mean of its micro-batches' losses; a probe record holds that loss
    and the multipliers the step's LRs carried, and its KLs are over the answer tokens;
    history["lr"] is the language side's LR."""
    trainer = make_trainer(data, tmp_path, "--balance-alpha", "0.5", "--probe-every", "1",
                           "--probe-start", "0", "--probe-on", "any", "--lr", "1e-2",
                           "--grad-accum", "2")
    seen, used, masks = recording_micro_steps(trainer), [], []
    before_step = trainer.monitor.before_step

    def recording_before_step(step, inputs, logits, mask, **kwargs):
        labels = trainer.module.assemble_labels(inputs["labels"], inputs["attention_mask"],
                                                inputs["has_image"])
        masks.append(torch.equal(mask, answer_mask(labels)) and bool(mask.any()))
        return before_step(step, inputs, logits, mask, **kwargs)
    trainer.monitor.before_step = recording_before_step
    trainer.optimizer.register_step_pre_hook(lambda optimizer, *args: used.append(
        {group[GROUP_KEY]: (group["lr"] / (group["initial_lr"] * trainer.scheduler.base_schedule(
            trainer.step)), group["lr"]) for group in optimizer.param_groups}))
    batches, counter = trainer._batches(), TokenCounter()
    for step in range(4):
        loss, record = trainer.train_step(batches, counter)
        trainer.step += 1
        micro = [value for value, _ in seen[2 * step:2 * step + 2]]
        assert loss == pytest.approx(sum(micro) / 2, rel=1e-12)
        assert record["loss"] == loss
        assert record["m_feat"] == pytest.approx(used[-1][FEATURE][0], rel=1e-9)
        assert record["m_lang"] == pytest.approx(used[-1][LANGUAGE][0], rel=1e-9)
        assert trainer.history["lr"][-1] == used[-1][LANGUAGE][1]
    assert any(abs(u[FEATURE][0] - 1) > 1e-3 for u in used)    # the multipliers moved
    assert masks == [True] * 4                 # κ's KLs are over the answer tokens


def test_without_probes_a_step_returns_no_record(data, tmp_path):
    trainer = make_trainer(data, tmp_path, "--probe-every", "0")
    _, record = trainer.train_step(trainer._batches(), TokenCounter())
    assert record is None


@pytest.mark.parametrize("aux_weight", ["0", "0.5"])
def test_a_due_probe_waits_for_the_next_image_text_batch(data, tmp_path, aux_weight):
    """--probe-on image: a probe due at a text-only step runs at the next image-text step, with
    or without the auxiliary loss (whose step decides the probe first)."""
    trainer = make_trainer(data, tmp_path, "--probe-every", "3", "--probe-start", "0",
                           "--aux-weight", aux_weight, "--steps", "16")
    seen, batches, counter, records = recording_micro_steps(trainer), trainer._batches(), TokenCounter(), []
    for _ in range(16):
        _, record = trainer.train_step(batches, counter)
        trainer.step += 1
        if record is not None:
            records.append(record)
    probed = [record["step"] for record in records]
    expected, due = [], False
    for step, (_, image) in enumerate(seen):
        due = due or step % 3 == 0
        if due and image:
            expected.append(step)
            due = False
    assert probed == expected and any(step % 3 for step in expected)   # one was deferred
    # any λ > 0 runs the auxiliary step (0.5 too): from the second probe on, at κ̂ ≠ 1
    assert any(record.get("aux_side") for record in records) == (aux_weight != "0")
    assert set(trainer.aux_cache) == ({"image"} if aux_weight != "0" else set())   # cached by kind


def test_the_auxiliary_step_trains_the_lagging_side_it_reports(data, tmp_path):
    """At a probe with λ > 0: the first batch of a kind is only cached (aux_loss 0); the next one
    of that kind re-forwards the cached batch and puts −λ·KL(sg(p_prev) ‖ p) over its answer
    tokens into the lagging side's gradients only (κ̂ > 1: language, aux_side −1; κ̂ < 1:
    feature, +1). Each batch is cached under its own kind."""
    from mlan_kernels.training.auxiliary import auxiliary_kl_loss
    trainer = make_trainer(data, tmp_path, "--aux-weight", "0.5", "--probe-every", "1")
    image = [i for i in range(len(trainer.train_set)) if trainer.train_set[i]["has_image"]]
    text = [i for i in range(len(trainer.train_set)) if not trainer.train_set[i]["has_image"]]
    for kappa, side, sign in ((100.0, 1, -1.0), (0.01, 0, 1.0)):
        trainer.aux_cache.clear()
        trainer.monitor.kappa_hat = kappa
        for indices, kind in ((image[:4], "image"), (text[:4], "text")):
            trainer.optimizer.zero_grad(set_to_none=True)
            inputs, out, image_batch = trainer._micro_step(indices, TokenCounter(), last=True)
            assert trainer._auxiliary(inputs, out, image_batch) == {"aux_side": 0.0, "aux_loss": 0.0}
            assert set(trainer.aux_cache) == ({"image"} if kind == "image" else {"image", "text"})
            assert bool(trainer.aux_cache[kind][0]["has_image"].any()) == (kind == "image")
        trainer.optimizer.step()                     # p moves away from the cached p_prev
        cached, previous, mask = trainer.aux_cache["image"]
        with torch.no_grad():
            expected = auxiliary_kl_loss(trainer.module(**cached).logits, previous, mask, 0.5)
        labels = trainer.module.assemble_labels(cached["labels"], cached["attention_mask"], cached["has_image"])
        assert torch.equal(mask, answer_mask(labels))
        trainer.optimizer.zero_grad(set_to_none=True)
        inputs, out, image_batch = trainer._micro_step(image[4:8], TokenCounter(), last=True)
        before = [[p.grad.clone() if p.grad is not None else None for p in group] for group in trainer.sides]
        result = trainer._auxiliary(inputs, out, image_batch)
        assert result["aux_side"] == sign and result["aux_loss"] == pytest.approx(float(expected), rel=1e-5)
        for index, group in enumerate(trainer.sides):
            changed = any(b is None or not torch.equal(b, p.grad) for b, p in zip(before[index], group)
                          if p.grad is not None)
            assert changed == (index == side), (kappa, index)


def test_a_skipped_step_keeps_the_weights_logs_the_language_lr_and_advances_the_schedule(
        data, tmp_path, monkeypatch):
    """--nan-policy skip-step, with α > 0 so the two sides' LRs differ: the non-finite step
    changes no parameter and returns no record, history["lr"] gets the language side's LR of
    that step, and every group's LR moves on by the schedule (κ̂ unchanged)."""
    trainer = make_trainer(data, tmp_path, "--balance-alpha", "0.5", "--probe-every", "1",
                           "--probe-start", "0", "--probe-on", "any", "--lr", "1e-2",
                           "--nan-policy", "skip-step")
    batches, counter = trainer._batches(), TokenCounter()
    for _ in range(3):
        trainer.train_step(batches, counter)
        trainer.step += 1
    lrs = {group[GROUP_KEY]: group["lr"] for group in trainer.optimizer.param_groups}
    assert abs(lrs[FEATURE] / lrs[LANGUAGE] - 1) > 1e-3          # κ̂ ≠ 1: the sides differ
    weights = {name: p.detach().clone() for name, p in trainer.module.named_parameters()
               if p.requires_grad}
    poison_gradients_at(monkeypatch, 0)              # the next step, a language-side gradient
    _, record = trainer.train_step(batches, counter)
    assert record is None and trainer.history["skipped_steps"] == [3]
    assert trainer.history["lr"][-1] == lrs[LANGUAGE]
    for name, p in trainer.module.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, weights[name]), name
    factor = trainer.scheduler.base_schedule(4) / trainer.scheduler.base_schedule(3)
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(lrs[group[GROUP_KEY]] * factor, rel=1e-9)


def test_a_non_finite_step_error_names_each_sides_norm(data, tmp_path, monkeypatch):
    """--nan-policy error: the message names the step and the feature and language gradient
    norms, each its own (here only the language side's is NaN)."""
    trainer = make_trainer(data, tmp_path, "--max-grad-norm", "0")
    image = next(i for i in range(len(trainer.train_set)) if trainer.train_set[i]["has_image"])
    poison_gradients_at(monkeypatch, 0)
    with pytest.raises(NonFiniteError) as error:
        trainer.train_step(iter([[image]]), TokenCounter())
    found = re.search(r"step 0: non-finite loss \S+ or gradient norms "
                      r"\(feature (\S+), language (\S+)\)", str(error.value))
    assert found and found.group(2) == "nan", str(error.value)
    feature = float(found.group(1))
    assert 0 < feature < float("inf")        # an image batch trains the feature side too


def test_task_of_reads_the_synthetic_task_from_a_sample_id():
    assert task_of("eval-00012-count") == "count" and task_of("train-7-colour") == "colour"
    for other in ("eval-x-count", "eval-1", "a-1-b-c", "", 17):
        assert task_of(other) == "all", other


def test_evaluation_reports_every_held_out_task_of_each_modality(data, tmp_path):
    """The report's per-task accuracies are keyed by the synthetic data's tasks (from the
    sample ids): each modality lists exactly the tasks of its held-out samples, each sample once."""
    trainer = make_trainer(data, tmp_path, "--eval-samples", "100")
    with open(os.path.join(data, "eval.jsonl")) as lines:
        records = [json.loads(line) for line in lines]
    expected = collections.defaultdict(collections.Counter)
    for record in records:
        expected["image" if record.get("image") else "text"][record["task"]] += 1
    results = trainer.evaluate()
    assert {modality: set(entry["by_task"]) for modality, entry in results.items()} == {
        modality: set(tasks) for modality, tasks in expected.items()}
    assert {modality: entry["samples"] for modality, entry in results.items()} == {
        modality: sum(tasks.values()) for modality, tasks in expected.items()}


def test_the_run_record_holds_the_resolved_options(data, tmp_path):
    """config_dict (run.json, what a resume compares): the options plus the resolved defaults
    (max length 64 for the tiny models, train_base True, the device type, one process)."""
    trainer = make_trainer(data, tmp_path)
    record = trainer.config_dict()
    assert {key: record[key] for key in ("max_length", "train_base", "device", "world_size")} == {
        "max_length": 64, "train_base": True, "device": "cpu", "world_size": 1}
    assert record["language_share"] == 0.5 and record["batch_size"] == 4


class _Truncated:
    """A dataset stand-in: `size` records, `cut` of them with truncated answers."""
    def __init__(self, size, cut):
        self.size, self.answers_truncated = size, cut

    def __len__(self):
        return self.size


def test_truncated_answers_are_accepted_up_to_one_percent_of_the_records(data, tmp_path):
    trainer = make_trainer(data, tmp_path)
    check_truncation(trainer.config, "train.jsonl", _Truncated(100, 1))          # exactly 1 %: accepted
    check_truncation(trainer.config, "train.jsonl", _Truncated(0, 0))            # no records
    with pytest.raises(ValueError, match="^" + re.escape(
            "--max-length 64 cuts answer tokens of 2.0% of train.jsonl's records (2 of 100; at "
            "most 1% accepted): raise --max-length or pass --allow-truncation") + "$"):
        check_truncation(trainer.config, "train.jsonl", _Truncated(100, 2))
    with pytest.raises(ValueError, match="cuts answer tokens of 100.0% of eval.jsonl's records"):
        check_truncation(trainer.config, "eval.jsonl", _Truncated(1, 1))       # one record, cut
