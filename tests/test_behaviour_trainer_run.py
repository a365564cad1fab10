"""What a `mlan-train` user gets from setting up and running a MixedTrainer (beyond one step,
which test_behaviour_trainer.py covers):

* --device auto picks CUDA when torch sees a GPU and the CPU otherwise; any other name is used as
  given;
* --aux-weight > 0 with more than one process is refused before anything is loaded;
"""
import pytest
import torch

from mlan_train.config import build_parser, config_from_args
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
