"""What a `mlan-train` user gets from several processes (MixedTrainer with world_size 2), with
the ranks as threads of this interpreter (tests/threaded_ranks.py; test_train_mixed.py runs the
same through torchrun and gloo):

* each rank trains its own share of every global batch (the MLAN sampler of its rank);
* two ranks probe the same κ̂ (from rank-mean KLs) and end with the same weights; rank 0
  returns the run summary, the others None; the checkpoint holds every rank's state, also when
  one rank reaches `save` late;
* the summary's token counts are the sum of every rank's own (exact beyond 2^24 tokens), its
  loss curve the rank mean, and its weight difference the largest between ranks over
  trainable parameters only;
* the evaluation shards the held-out samples across ranks and merges the counts: every rank
  records the single-process evaluation of the same weights;
* whether the final evaluation is missing is rank 0's decision, on every rank;
* a resumed run gives every rank its own state back (its loss history, from its own file).
"""
import copy
import os
import time

import pytest
import torch

from mlan_kernels.data.dataset import split_by_modality
from mlan_kernels.data.sampler import MixtureSampler, ModalityLengthBatchSampler
from mlan_train.trainer import MixedTrainer
from threaded_ranks import run_ranks

from test_behaviour_trainer import data, make_trainer  # noqa: F401 (data is a fixture)


def rank_state(rank, world_size, history, module=None):
    """A MixedTrainer of `world_size` ranks holding only what the end-of-run collectives read."""
    trainer = MixedTrainer.__new__(MixedTrainer)
    trainer.rank, trainer.world_size, trainer.device = rank, world_size, torch.device("cpu")
    trainer.history, trainer.module, trainer.step = history, module, 5
    return trainer


def test_the_run_end_sums_tokens_averages_losses_and_finds_the_largest_trainable_difference():
    def rank_main(rank):
        module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.fill_(1.0)
            module[0].weight[1, 0] += (0.0, -0.5, 0.25)[rank]   # trainable: 0.5, 0.25 off
            module[1].bias += 9.0 * rank                          # frozen: not counted
        module[1].bias.requires_grad_(False)
        history = {"tokens": {"text_tokens": 10 * (rank + 1), "image_tokens": 2 ** 24 + 1},
                   "loss": [1.0 + rank / 10, 2.0 * rank / 3]}            # not fp32 numbers
        return rank_state(rank, 3, history, module)._across_ranks()
    totals = run_ranks(3, rank_main)
    assert totals[0] == totals[1] == totals[2]
    assert totals[0]["tokens"] == {"text_tokens": 60, "image_tokens": 3 * 2 ** 24 + 3}
    assert totals[0]["loss"] == pytest.approx([1.1, 2.0 / 3], rel=1e-12, abs=0)   # fp64 means
    assert totals[0]["rank_weight_max_diff"] == 0.5


@pytest.mark.parametrize("rank0_evaluated", [True, False])
def test_whether_the_final_evaluation_is_missing_is_rank_zeros_decision(rank0_evaluated):
    def rank_main(rank):
        evaluated = rank0_evaluated == (rank == 0)                # rank 1 holds the opposite
        return rank_state(rank, 2, {"eval": [{"step": 5}] if evaluated else []})._final_eval_missing()
    assert run_ranks(2, rank_main) == [not rank0_evaluated] * 2


def test_two_ranks_train_in_sync_and_report_the_sum_of_their_work(data, tmp_path):
    options = ("--steps", "4", "--eval-every", "2", "--grad-accum", "2", "--probe-every", "2",
               "--probe-start", "0", "--probe-on", "any", "--balance-alpha", "0.5")
    trainers, first_epoch = [None, None], [None, None]

    def rank_main(rank):
        trainers[rank] = make_trainer(data, tmp_path, *options, rank=rank, world_size=2)
        first_epoch[rank] = list(copy.deepcopy(trainers[rank].batches))
        return trainers[rank].train()
    summary, other = run_ranks(2, rank_main)
    text, image = split_by_modality(trainers[0].train_set)
    for rank, trainer in enumerate(trainers):
        mixture = MixtureSampler(text, image, 0.5, seed=0)
        assert first_epoch[rank] == list(ModalityLengthBatchSampler(
            mixture, trainer.train_set.lengths, trainer.train_set.has_image, 4, world_size=2,
            rank=rank, seed=0))
    assert {"rank0.pt", "rank1.pt"} <= set(os.listdir(tmp_path / "checkpoint"))
    assert other is None and summary["config"]["world_size"] == 2
    for first, second in zip(*(t.module.parameters() for t in trainers)):
        assert torch.equal(first, second)
    assert summary["rank_weight_max_diff"] == 0.0
    own = [t.counter.as_dict() for t in trainers]
    assert summary["tokens"] == {key: own[0][key] + own[1][key] for key in own[0]}
    losses = [t.history["loss"] for t in trainers]
    assert summary["loss"] == pytest.approx([(a + b) / 2 for a, b in zip(*losses)], abs=1e-6)
    assert trainers[0].history["eval"] == trainers[1].history["eval"]
    shared = ("step", "kl_feat", "kl_lang", "kappa", "kappa_ema", "m_feat", "m_lang")
    probes = [[{key: record[key] for key in shared} for record in t.history["kappa"]]
              for t in trainers]
    assert len(probes[0]) == 2 and probes[0] == probes[1]          # κ̂ from the rank-mean KLs
    assert [record["step"] for record in summary["eval"]] == [2, 4]

    single = make_trainer(data, tmp_path / "single", *options)
    single.module.load_state_dict(trainers[0].module.state_dict())
    expected = single.evaluate()
    for modality in ("text", "image"):
        got = summary["final_eval"][modality]
        assert got["samples"] == expected[modality]["samples"] > 0
        assert got["by_task"] == expected[modality]["by_task"]
        assert got["loss"] == pytest.approx(expected[modality]["loss"], rel=1e-5)


def test_a_resumed_two_rank_run_gives_each_rank_its_own_state_back(data, tmp_path):
    options = ("--steps", "3", "--probe-every", "0")
    first = [None, None]

    def run_two_steps(rank):
        first[rank] = make_trainer(data, tmp_path, *options, rank=rank, world_size=2)
        first[rank].train(stop_after=2)

    def resume(rank):
        trainer = make_trainer(data, tmp_path, *options, "--resume", str(tmp_path / "checkpoint"),
                               rank=rank, world_size=2)
        trainer.train()
        return trainer
    run_ranks(2, run_two_steps)
    assert first[0].history["loss"] != first[1].history["loss"]    # each rank its own batches
    resumed = run_ranks(2, resume)
    for before, after in zip(first, resumed):
        assert after.history["loss"][:2] == before.history["loss"] and len(after.history["loss"]) == 3


@pytest.mark.parametrize("late", ["rank 0 prepares", "rank 1 writes"])
def test_a_checkpoint_holds_every_ranks_state_whichever_rank_is_late(data, tmp_path, monkeypatch,
                                                                     late):
    """save waits for every rank: for rank 0 to make the staging directory before the others
    write into it, and for every rank's file before rank 0 swaps the checkpoint in. One rank is
    made late at one of those points (0.5 s)."""
    import mlan_train.state as state
    recover, save = state.recover, torch.save

    def late_recover(directory):
        if late == "rank 0 prepares":
            time.sleep(0.5)
        recover(directory)

    def late_save(obj, path, *args, **kwargs):
        if late == "rank 1 writes" and str(path).endswith("rank1.pt"):
            time.sleep(0.5)
        save(obj, path, *args, **kwargs)
    monkeypatch.setattr(state, "recover", late_recover)
    monkeypatch.setattr(torch, "save", late_save)

    def rank_main(rank):
        trainer = make_trainer(data, tmp_path, "--probe-every", "0", rank=rank, world_size=2)
        trainer.history["loss"] = [float(rank)]
        trainer.save()
    run_ranks(2, rank_main)
    for rank in (0, 1):
        saved = torch.load(tmp_path / "checkpoint" / f"rank{rank}.pt", weights_only=False)
        assert saved["history"]["loss"] == [float(rank)]
