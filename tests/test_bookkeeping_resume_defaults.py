"""Resuming a checkpoint written before an option existed: the missing option counts as its
default. A run that keeps the default resumes; a run that sets another value is refused, naming
the default as the checkpoint's value (it cannot have trained with anything else)."""
import shutil

import pytest
import torch

from mlan_train.config import TrainConfig, options_dict
from mlan_train.state import STATE_NAME, changed_options

from test_train_mixed import data, fails, train  # noqa: F401 (data is a fixture)

SHORT = ["--steps", "3", "--no-plots", "--language-share", "0.5"]
DEFAULTS = {"temperature": 10.0, "max_grad_norm": 1.0, "lr": 2e-3, "out": "runs/x"}


def test_an_option_the_checkpoint_lacks_is_compared_as_its_default():
    saved = {"lr": 2e-3}                                     # written before the other two existed
    assert changed_options(saved, {"lr": 2e-3, "temperature": 10.0, "max_grad_norm": 1.0},
                           DEFAULTS) == []
    assert changed_options(saved, {"lr": 2e-3, "temperature": 5.0, "max_grad_norm": 1.0},
                           DEFAULTS) == [("temperature", 10.0, 5.0)]
    assert changed_options({}, {"lr": 1e-2, "max_grad_norm": 0.5}, DEFAULTS) == [
        ("lr", 2e-3, 1e-2), ("max_grad_norm", 1.0, 0.5)]
    assert changed_options({"out": "a"}, {"out": "b"}, DEFAULTS) == []       # may change


def test_the_defaults_resume_compares_with_are_the_configs():
    defaults = options_dict(TrainConfig())
    assert defaults["temperature"] == 10.0 and defaults["nan_policy"] == "error"


@pytest.fixture(scope="module")
def older_checkpoint(data, tmp_path_factory):
    """A run stopped after 1 of 3 steps, its checkpoint's config without "temperature" and
    "nan_policy" (as one written before those options existed)."""
    out = tmp_path_factory.mktemp("older")
    train(data, out, *SHORT, "--stop-after", "1")
    path = out / "checkpoint" / STATE_NAME
    state = torch.load(path, weights_only=True)
    assert state["config"]["temperature"] == 10.0 and state["config"]["nan_policy"] == "error"
    del state["config"]["temperature"], state["config"]["nan_policy"]
    torch.save(state, path)
    return out / "checkpoint"


@pytest.mark.parametrize("option, value, default", [("--temperature", "5.0", "10.0"),
                                                    ("--nan-policy", "skip-step", "'error'")])
def test_resuming_with_another_value_than_the_missing_options_default_is_refused(
        data, older_checkpoint, tmp_path, capsys, option, value, default):
    status, message = fails(data, tmp_path, capsys, *SHORT, option, value,
                            "--resume", str(older_checkpoint))
    assert status == 2 and f"{option}: checkpoint {default}, this run " in message
    assert not (tmp_path / "checkpoint").exists()


def test_resuming_with_the_missing_options_default_is_accepted(data, older_checkpoint, tmp_path):
    copy = tmp_path / "older"
    shutil.copytree(older_checkpoint, copy)
    run = train(data, tmp_path, *SHORT, "--temperature", "10", "--resume", str(copy))
    assert run["resumed"] == [{"checkpoint": str(copy), "step": 1}] and len(run["loss"]) == 3
