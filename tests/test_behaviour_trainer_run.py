"""What a `mlan-train` user gets from setting up and running a MixedTrainer (beyond one step,
which test_behaviour_trainer.py covers):

* --device auto picks CUDA when torch sees a GPU and the CPU otherwise; any other name is used as
  given;
* --aux-weight > 0 with more than one process is refused before anything is loaded;
"""
import re

import pytest
import torch

from mlan_train.config import build_parser, config_from_args
from mlan_train.state import STATE_NAME
from mlan_train.trainer import MixedTrainer, resolve_device

from test_behaviour_trainer import TINY, data, make_trainer  # noqa: F401 (data is a fixture)


@pytest.mark.parametrize("cuda", [True, False])
def test_device_auto_is_cuda_exactly_when_torch_sees_a_gpu(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device("auto") == torch.device("cuda" if cuda else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_aux_weight_with_several_processes_is_refused_before_loading(tmp_path):
    config = config_from_args(build_parser().parse_args(
        ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), *TINY,
         "--aux-weight", "0.1"]))
    with pytest.raises(ValueError, match=r"^--aux-weight > 0 runs in one process only"):
        MixedTrainer(config, rank=1, world_size=2)


def test_train_without_arguments_runs_every_step_then_evaluates_and_saves(data, tmp_path):
    trainer = make_trainer(data, tmp_path, "--steps", "3", "--probe-every", "0")
    summary = trainer.train()
    assert trainer.step == 3 and len(summary["loss"]) == 3 and len(summary["lr"]) == 3
    assert [record["step"] for record in summary["eval"]] == [3]
    state = torch.load(tmp_path / "checkpoint" / STATE_NAME, weights_only=True)
    assert state["step"] == 3


def test_the_progress_bar_counts_on_from_a_resumed_step_to_the_end_with_loss_and_lr(
        data, tmp_path, capsys):
    options = ("--steps", "3", "--probe-every", "0", "--log-every", "1")
    make_trainer(data, tmp_path, *options).train(stop_after=2)
    capsys.readouterr()
    make_trainer(data, tmp_path, *options, "--progress", "--resume", str(tmp_path / "checkpoint")).train()
    bar = capsys.readouterr().err
    assert "share 0.5:" in bar and "2/3" in bar and "3/3" in bar and "1/3" not in bar, bar
    assert re.search(r"3/3 .*loss=\d+\.\d{3}, lr=\d\.\d\de-\d\d\]", bar), bar
