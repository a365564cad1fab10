"""mlan-train --aux-weight (CoMMIT's auxiliary loss, ours; training/auxiliary.py) in the trainer:
λ > 0 changes only the lagging side's gradients at a probe step; λ = 0 takes the code path of a
run without the option, bit for bit. Tiny models, tiny data."""
import pytest
import torch

import mlan_train.trainer as trainer_module
from mlan_kernels.data.collate import TokenCounter
from mlan_kernels.data.synthetic import make_synthetic
from mlan_kernels.training.auxiliary import lagging_side
from mlan_kernels.training.balance import FEATURE
from mlan_train.config import build_parser, config_from_args
from mlan_train.trainer import MixedTrainer

TINY = ["--dim", "32", "--layers", "1", "--heads", "2", "--clip-dim", "32", "--clip-layers", "4",
        "--batch-size", "4", "--warmup-steps", "1", "--no-progress", "--eval-samples", "4",
        "--log-every", "1", "--no-plots", "--threads", "1", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    make_synthetic(directory, train_size=96, eval_size=16, seed=5)
    return str(directory)


def make_trainer(data, out, *extra):
    argv = ["--data", data, "--out", str(out), *TINY, *extra]
    return MixedTrainer(config_from_args(build_parser().parse_args(argv)))


def gradients_at_each_step(trainer, steps):
    """[(κ̂ before the step, [feature grads], [language grads])] as optimizer.step() sees them."""
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append((trainer.monitor.kappa_hat,
                     [p.grad.clone() if p.grad is not None else None for p in trainer.sides[0]],
                     [p.grad.clone() if p.grad is not None else None for p in trainer.sides[1]]))
        return step(*args, **kwargs)
    trainer.optimizer.step = recording_step
    batches, counter = trainer._batches(), TokenCounter()
    for _ in range(steps):
        trainer.train_step(batches, counter)
        trainer.step += 1
    return seen


def same(grads_a, grads_b) -> bool:
    return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
               for a, b in zip(grads_a, grads_b))


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step")     # the recording wrapper
@pytest.mark.parametrize("share", ["0", "1"])      # image-text batches only / text-only only
def test_positive_weight_changes_only_the_lagging_sides_gradients(data, tmp_path, share):
    options = ["--steps", "4", "--probe-every", "1", "--probe-start", "0", "--probe-on", "any",
               "--language-share", share,
               "--kappa-min-kl", "0"]          # every probe counts: κ̂ after the first one
    runs = []
    for weight in ("0", "5"):
        trainer = make_trainer(data, tmp_path / weight, *options, "--aux-weight", weight)
        runs.append((trainer, gradients_at_each_step(trainer, 2)))
    (plain, plain_seen), (aux, aux_seen) = runs
    # step 0: no κ̂ and nothing cached yet -> identical gradients
    assert same(plain_seen[0][1], aux_seen[0][1]) and same(plain_seen[0][2], aux_seen[0][2])
    # step 1: κ̂ from step 0's probe picks the lagging side; only its gradients change
    kappa_hat = aux_seen[1][0]
    assert kappa_hat == plain_seen[1][0] and kappa_hat is not None
    side = lagging_side(kappa_hat)
    assert side is not None
    lagging, leading = (1, 2) if side == FEATURE else (2, 1)
    assert same(plain_seen[1][leading], aux_seen[1][leading])
    assert not same(plain_seen[1][lagging], aux_seen[1][lagging])
    record = aux.monitor.records[1]
    assert record["aux_side"] == (1.0 if side == FEATURE else -1.0) and record["aux_loss"] < 0
    assert aux.monitor.records[0]["aux_side"] == 0.0 and "aux_side" not in plain.monitor.records[0]


def test_zero_weight_is_bit_identical_to_a_run_without_it(data, tmp_path, monkeypatch):
    options = ["--steps", "6", "--probe-every", "2", "--language-share", "0.5",
               "--balance-alpha", "0.5"]
    first = make_trainer(data, tmp_path / "a", *options).train()

    def never(*args, **kwargs):
        raise AssertionError("λ = 0 must not reach the auxiliary loss")
    monkeypatch.setattr(trainer_module, "auxiliary_kl_loss", never)
    monkeypatch.setattr(MixedTrainer, "_auxiliary", never)
    trainer = make_trainer(data, tmp_path / "b", *options, "--aux-weight", "0")
    second = trainer.train()
    assert first["loss"] == second["loss"] and first["lr"] == second["lr"]
    assert _strip_seconds(first["kappa"]) == _strip_seconds(second["kappa"])
    assert first["final_eval"] == second["final_eval"]
    assert trainer.aux_cache == {}


def _strip_seconds(records):
    return [{k: v for k, v in r.items() if k != "probe_seconds"} for r in records]


def test_aux_weight_needs_probes_and_one_process(data, tmp_path):
    with pytest.raises(ValueError, match="--aux-weight needs κ probes"):
        make_trainer(data, tmp_path, "--steps", "4", "--probe-every", "0", "--aux-weight", "1")
    with pytest.raises(ValueError, match="--aux-weight must be"):
        make_trainer(data, tmp_path, "--steps", "4", "--aux-weight", "-1")
