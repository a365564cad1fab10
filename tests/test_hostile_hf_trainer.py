"""Hostile settings and signals through transformers.Trainer (MlanTrainer + BalanceCallback),
the siblings of test_hostile_training.py's mlan-train cases: NaN/negative/reversed balance
settings refused at construction, a NaN κ̂ in a checkpoint's balance_state.json refused on
resume before any weight changes, SIGTERM/SIGINT save a checkpoint that resumes exactly."""
import json
import os
import re
import signal

import pytest

pytest.importorskip("accelerate")
from transformers import TrainerCallback  # noqa: E402

from mlan_kernels.training.hf_balance import BALANCE_STATE_NAME, read_balance_state  # noqa: E402
from mlan_kernels.training.hf_trainer import BalanceCallback  # noqa: E402

from test_hf_trainer import StopAt, assert_same_weights, data, make_trainer, weights  # noqa: E402,F401

NAN, INF = float("nan"), float("inf")
CLIP = "clip must be (m_min, m_max) of finite numbers with 0 < m_min <= 1 <= m_max, got "


@pytest.mark.parametrize("options, expected", [
    (dict(alpha=NAN), "alpha must be a finite number >= 0, got nan"),
    (dict(alpha=-1.0), "alpha must be a finite number >= 0, got -1.0"),
    (dict(eps=NAN), "eps must be a finite number > 0, got nan"),
    (dict(eps=0.0), "eps must be a finite number > 0, got 0.0"),
    (dict(beta=NAN), "beta must be in [0, 1), got nan"),
    (dict(clip=(-1, -0.5)), CLIP + "(-1, -0.5)"),
    (dict(clip=(10, 0.1)), CLIP + "(10, 0.1)"),
    (dict(clip=(0.1, NAN)), CLIP + "(0.1, nan)"),
])
def test_balance_callback_refuses_bad_settings_at_construction(options, expected):
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        BalanceCallback(**options)


@pytest.mark.parametrize("text, expected", [
    ('{"kappa_hat": NaN, "probe_due": false}', "kappa_hat must be a finite number > 0 (or null "
                                               "before the first probe), got nan"),
    ('{"kappa_hat": Infinity, "probe_due": false}', "got inf"),
    ('{"kappa_hat": -2.0, "probe_due": false}', "got -2.0"),
    ('{"kappa_hat": "1", "probe_due": false}', "got '1'"),
    ('{"kappa_hat": 1.0, "probe_due": "yes"}', "probe_due must be true or false, got 'yes'"),
    ('{"kappa_hat": 1.0}', "expected {\"kappa_hat\": ..., \"probe_due\": ...}"),
    ('[1, 2', "not a JSON balance state"),
])
def test_a_bad_balance_state_is_refused(tmp_path, text, expected):
    path = tmp_path / BALANCE_STATE_NAME
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(expected)):
        read_balance_state(str(path))
    callback = BalanceCallback()
    with pytest.raises(ValueError, match=re.escape(expected)):
        callback.load_checkpoint(str(tmp_path))
    assert callback.kappa_hat is None


def test_good_balance_states_load(tmp_path):
    for saved in ({"kappa_hat": None, "probe_due": True}, {"kappa_hat": 2.5, "probe_due": False}):
        (tmp_path / BALANCE_STATE_NAME).write_text(json.dumps(saved))
        callback = BalanceCallback()
        callback.load_checkpoint(str(tmp_path))
        assert (callback.kappa_hat, callback._probe_due) == (saved["kappa_hat"], saved["probe_due"])


class SignalAt(TrainerCallback):
    """Deliver `signum` to this process during optimizer step `step` (0-based)."""

    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_resume_with_a_nan_kappa_hat_is_refused_before_any_weight_changes(data, tmp_path):
    dataset, _ = data
    first = make_trainer(dataset, tmp_path, steps=8, save_steps=2,
                         callbacks=[BalanceCallback(probe_every=1, alpha=1.0, start_step=0), StopAt(2)])
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = json.loads((checkpoint / BALANCE_STATE_NAME).read_text())
    assert saved["kappa_hat"] > 0
    (checkpoint / BALANCE_STATE_NAME).write_text(json.dumps({"kappa_hat": NAN, "probe_due": False}))
    resumed = make_trainer(dataset, tmp_path, steps=8)
    before = weights(resumed.model)
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint / BALANCE_STATE_NAME}: kappa_hat must "
                                                   f"be a finite number > 0")):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_same_weights(weights(resumed.model), before)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL      # handlers given back


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_that_resumes_exactly(data, tmp_path, signum):
    dataset, _ = data
    straight = make_trainer(dataset, tmp_path / "straight", steps=8, save_steps=100)
    straight.train()
    before = signal.getsignal(signum)
    first = make_trainer(dataset, tmp_path / "split", steps=8, save_steps=100,
                         callbacks=[BalanceCallback(probe_every=2, alpha=1.0), SignalAt(2, signum)])
    first.train()
    assert first.state.global_step == 3 and first.stop_on_signal.stopped_by == signum
    assert signal.getsignal(signum) == before
    assert [name for name in os.listdir(tmp_path / "split") if name.startswith("checkpoint")] == ["checkpoint-3"]
    resumed = make_trainer(dataset, tmp_path / "split", steps=8, save_steps=100)
    resumed.train(resume_from_checkpoint=True)                     # finds checkpoint-3
    assert resumed.state.global_step == 8 and resumed.stop_on_signal.stopped_by is None
    assert_same_weights(weights(resumed.model), weights(straight.model), atol=1e-6)
