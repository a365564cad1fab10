"""Hostile training settings and runs through mlan-train and the balance classes it uses:
NaN/inf/negative/reversed balance settings refused where they enter, a NaN κ̂ in a checkpoint
refused on resume, a different dataset at the same --data refused on resume, a second run on
the same --out refused while the first holds it, a run whose every step is skipped exits
non-zero, and SIGTERM/SIGINT leave a checkpoint that resumes bit-identically.
(The same classes through transformers.Trainer: test_hostile_hf_trainer.py.)"""
import fcntl
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from mlan_kernels.training.balance import BalanceMonitor
from mlan_kernels.training.scheduler import BalanceScheduler, balance_param_groups
from mlan_train import trainer as trainer_module
from mlan_train.cli import main
from mlan_train.preflight import LOCK_NAME
from mlan_train.state import STATE_NAME

from test_train_mixed import TINY, data, fails, train  # noqa: F401 (data is a fixture)

SHORT = ["--steps", "4", "--no-plots", "--language-share", "0.5"]
NAN, INF = float("nan"), float("inf")
PROBED = ["--balance-alpha", "0.5", "--probe-start", "0", "--probe-every", "1", "--kappa-min-kl", "0",
          "--probe-on", "any"]
CLIP = "clip must be (m_min, m_max) of finite numbers with 0 < m_min <= 1 <= m_max, got "


def two_groups():
    feature, language = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    return feature, language, torch.optim.SGD(balance_param_groups([feature], [language], lr=1.0))


# ---------------------------------------------------------------- settings where they enter
@pytest.mark.parametrize("alpha, clip, expected", [
    (NAN, (0.1, 10.0), "alpha must be a finite number >= 0, got nan"),
    (INF, (0.1, 10.0), "alpha must be a finite number >= 0, got inf"),
    (-0.5, (0.1, 10.0), "alpha must be a finite number >= 0, got -0.5"),
    (0.5, (-1, -0.5), CLIP + "(-1, -0.5)"),
    (0.5, (10, 0.1), CLIP + "(10, 0.1)"),
    (0.5, (NAN, 10.0), CLIP + "(nan, 10.0)"),
    (0.5, (0.1, INF), CLIP + "(0.1, inf)"),
    (0.5, (0.1,), "clip must be a pair (m_min, m_max), got (0.1,)"),
])
def test_balance_scheduler_refuses_bad_alpha_and_clip(alpha, clip, expected):
    _, _, optimizer = two_groups()
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        BalanceScheduler(optimizer, alpha=alpha, clip=clip)


@pytest.mark.parametrize("kappa", [NAN, INF, 0.0, -1.0, None, "2"])
def test_balance_scheduler_refuses_a_bad_kappa_hat(kappa):
    _, _, optimizer = two_groups()
    scheduler = BalanceScheduler(optimizer, alpha=0.5)
    with pytest.raises(ValueError, match="kappa_hat must be a finite number > 0"):
        scheduler.update_kappa(kappa)
    assert scheduler.multipliers == {"feature": 1.0, "language": 1.0}


def test_a_good_clip_still_scales_as_documented():
    """κ̂ = 4, α = 0.5: m_feat = 1/2, m_lang = 2, inside clip (0.1, 10)."""
    feature, language, optimizer = two_groups()
    scheduler = BalanceScheduler(optimizer, alpha=0.5, clip=(0.1, 10.0))
    scheduler.update_kappa(4.0)
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == [0.5, 2.0]


@pytest.mark.parametrize("option, value, expected", [
    ("eps", NAN, "eps must be a finite number > 0, got nan"),
    ("eps", 0.0, "eps must be a finite number > 0, got 0.0"),
    ("eps", INF, "eps must be a finite number > 0, got inf"),
    ("beta", NAN, "beta must be in [0, 1), got nan"),
    ("min_kl", NAN, "min_kl must be finite and >= 0, got nan"),
])
def test_balance_monitor_refuses_non_finite_settings(option, value, expected):
    feature, language, _ = two_groups()
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        BalanceMonitor(lambda batch: batch, [feature], [language], **{option: value})


@pytest.mark.parametrize("kappa", [NAN, INF, -2.0, "1"])
def test_balance_monitor_refuses_a_restored_bad_kappa_hat(kappa):
    feature, language, _ = two_groups()
    monitor = BalanceMonitor(lambda batch: batch, [feature], [language])
    with pytest.raises(ValueError, match="BalanceMonitor state's kappa_hat must be a finite number > 0"):
        monitor.load_state_dict({"kappa_hat": kappa, "ema": "linear", "skipped": 0})
    assert monitor.kappa_hat is None


@pytest.mark.parametrize("options, expected", [
    (["--balance-alpha", "nan"], "--balance-alpha must be finite and >= 0, got nan"),
    (["--kappa-eps", "inf"], "--kappa-eps must be finite and > 0, got inf"),
    (["--kappa-beta", "nan"], "--kappa-beta must be finite and in [0, 1), got nan"),
])
def test_mlan_train_refuses_the_same_settings_before_step_0(data, tmp_path, capsys, options, expected):
    status, message = fails(data, tmp_path, capsys, *SHORT, *options)
    assert status == 2 and message == f"mlan-train: error: {expected}"
    assert not (tmp_path / "checkpoint").exists()


# ---------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped")
    train(data, out, *SHORT, *PROBED, "--stop-after", "2")
    state = torch.load(out / "checkpoint" / STATE_NAME, weights_only=True)
    assert state["monitor"]["kappa_hat"] is not None and math.isfinite(state["monitor"]["kappa_hat"])
    return out / "checkpoint"


@pytest.mark.parametrize("kappa", [NAN, INF, -1.0])
def test_resume_refuses_a_nan_kappa_hat_in_the_checkpoint(data, stopped, tmp_path, capsys, kappa):
    copy = tmp_path / "copy"
    shutil.copytree(stopped, copy)
    state = torch.load(copy / STATE_NAME, weights_only=True)
    state["monitor"]["kappa_hat"] = kappa
    torch.save(state, copy / STATE_NAME)
    status, message = fails(data, tmp_path / "out", capsys, *SHORT, *PROBED,
                            "--resume", str(copy))
    assert status == 2 and f"BalanceMonitor state's kappa_hat must be a finite number > 0" in message
    assert f"got {kappa}" in message


def test_resume_refuses_a_different_dataset_at_the_same_path(data, tmp_path, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    train(str(copy), tmp_path / "run", *SHORT, "--stop-after", "2")
    lines = (copy / "train.jsonl").read_text().splitlines()
    (copy / "train.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")   # same records, other order
    status, message = fails(str(copy), tmp_path / "run", capsys, *SHORT,
                            "--resume", str(tmp_path / "run" / "checkpoint"))
    assert status == 2 and "the data file train.jsonl differs from the one the checkpoint trained on" in message


def test_resume_with_the_same_data_still_works(data, tmp_path):
    straight = train(data, tmp_path / "straight", *SHORT)
    train(data, tmp_path / "split", *SHORT, "--stop-after", "2")
    resumed = train(data, tmp_path / "split", *SHORT, "--resume", str(tmp_path / "split" / "checkpoint"))
    assert resumed["loss"] == straight["loss"]


@pytest.mark.parametrize("name, damage, expected", [
    (STATE_NAME, "empty", "empty file (0 bytes)"),
    (STATE_NAME, "truncated", "not a complete torch.save zip file"),
    ("rank0.pt", "empty", "empty file (0 bytes)"),
    ("trainable.safetensors", "truncated", "trainable.safetensors unreadable"),
])
def test_resume_from_an_empty_or_truncated_file_is_one_line(data, stopped, tmp_path, capsys, name, damage,
                                                            expected):
    copy = tmp_path / "copy"
    shutil.copytree(stopped, copy)
    path = copy / name
    with open(path, "r+b") as handle:
        handle.truncate(0 if damage == "empty" else os.path.getsize(path) // 2)
    status, message = fails(data, tmp_path / "out", capsys, *SHORT, *PROBED, "--resume", str(copy))
    assert status == 2 and f"--resume {copy}" in message and name in message and expected in message


# ---------------------------------------------------------------- one run per --out
def test_a_second_run_on_a_locked_out_is_refused_in_one_line(data, tmp_path, capsys):
    """The lock held by another process (as a running mlan-train holds it)."""
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"h = open({str(tmp_path / LOCK_NAME)!r}, 'a+'); fcntl.flock(h, fcntl.LOCK_EX)\n"
         "h.seek(0); h.truncate(); h.write(f'pid {os.getpid()}'); h.flush()\n"
         "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, message = fails(data, tmp_path, capsys, *SHORT)
    finally:
        holder.kill()
        holder.wait()
    assert status == 2 and f"--out {tmp_path}: another mlan-train run is using it (pid {holder.pid}" in message
    assert not (tmp_path / "checkpoint").exists()
    train(data, tmp_path, *SHORT)                  # the holder is gone: the lock is free again


def test_the_lock_is_held_while_training(data, tmp_path, monkeypatch):
    """During the run, taking the lock fails; after it, it succeeds."""
    seen = []
    original = trainer_module.MixedTrainer.train_step

    def probing(self, *args):
        with open(tmp_path / LOCK_NAME, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("held")
        return original(self, *args)
    monkeypatch.setattr(trainer_module.MixedTrainer, "train_step", probing)
    train(data, tmp_path, *SHORT)
    assert seen == ["held"] * 4
    with open(tmp_path / LOCK_NAME, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---------------------------------------------------------------- every step skipped
def poison_every_step(monkeypatch):
    original = trainer_module.scale_grads_

    def poisoned(groups, *args, **kwargs):
        next(p for p in groups[1] if p.grad is not None).grad.view(-1)[0] = float("nan")
        return original(groups, *args, **kwargs)
    monkeypatch.setattr(trainer_module, "scale_grads_", poisoned)


def test_a_run_whose_every_step_is_skipped_exits_1(data, tmp_path, capsys, monkeypatch):
    poison_every_step(monkeypatch)
    status, message = fails(data, tmp_path, capsys, *SHORT, "--nan-policy", "skip-step")
    assert status == 1 and "every one of the 4 steps (0 to 3) was skipped" in message
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "run.json").exists()


def test_a_resumed_invocation_whose_every_step_is_skipped_exits_1(data, tmp_path, capsys, monkeypatch):
    train(data, tmp_path, *SHORT, "--nan-policy", "skip-step", "--stop-after", "2")
    saved = (tmp_path / "checkpoint" / STATE_NAME).read_bytes()
    poison_every_step(monkeypatch)
    status, message = fails(data, tmp_path, capsys, *SHORT, "--nan-policy", "skip-step",
                            "--resume", str(tmp_path / "checkpoint"))
    assert status == 1 and "every one of the 2 steps (2 to 3) was skipped" in message
    assert (tmp_path / "checkpoint" / STATE_NAME).read_bytes() == saved      # kept as it was


# ---------------------------------------------------------------- signals
def signal_at(monkeypatch, step, signum):
    """Deliver `signum` to this process during optimizer step `step` (0-based)."""
    original = trainer_module.MixedTrainer.train_step

    def signalled(self, *args):
        if self.step == step:
            os.kill(os.getpid(), signum)
        return original(self, *args)
    monkeypatch.setattr(trainer_module.MixedTrainer, "train_step", signalled)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_that_resumes_bit_identically(data, tmp_path, capsys, monkeypatch,
                                                                  signum):
    straight = train(data, tmp_path / "straight", *SHORT)
    before = signal.getsignal(signum)
    signal_at(monkeypatch, 1, signum)
    capsys.readouterr()
    status = main(["--data", data, "--out", str(tmp_path / "split"), *TINY, *SHORT])
    err = capsys.readouterr().err.strip().splitlines()
    checkpoint = tmp_path / "split" / "checkpoint"
    name = signal.Signals(signum).name
    assert status == 128 + signum and "Traceback" not in "\n".join(err)
    assert err[-1] == (f"mlan-train: stopped by {name} after step 2; checkpoint saved in {checkpoint} "
                       f"(continue with --resume {checkpoint})")
    assert signal.getsignal(signum) == before                     # handlers given back
    assert torch.load(checkpoint / STATE_NAME, weights_only=True)["step"] == 2
    monkeypatch.undo()
    resumed = train(data, tmp_path / "split", *SHORT, "--resume", str(checkpoint))
    assert resumed["loss"] == straight["loss"]


# ---------------------------------------------------------------- --base
@pytest.fixture(scope="module")
def word_tokenizer():
    from mlan_kernels.data.synthetic import vocabulary_texts
    from mlan_kernels.data.tokenizer import WordTokenizer
    return WordTokenizer.from_texts(vocabulary_texts())


BASE_DAMAGE = {
    "base_json_not_json": (lambda d: (d / "base.json").write_text("{not json"), "base.json is not JSON"),
    "base_json_a_list": (lambda d: (d / "base.json").write_text("[1, 2]"),
                         "base.json must hold a JSON object, got list"),
    "llama_weights_gone": (lambda d: (d / "llama" / "model.safetensors").unlink(),
                           "llama/model.safetensors is missing or empty though base.json describes"),
    "clip_weights_empty": (lambda d: (d / "clip" / "model.safetensors").write_bytes(b""),
                           "clip/model.safetensors is missing or empty"),
}


@pytest.mark.parametrize("case", sorted(BASE_DAMAGE))
def test_a_damaged_base_is_a_one_line_error(tmp_path, word_tokenizer, case):
    from mlan_train.base import pretrained_base
    from test_base_pretrain import TINY as TINY_BASE
    pretrained_base(tmp_path / "base", word_tokenizer, TINY_BASE, log=lambda line: None)
    damage, expected = BASE_DAMAGE[case]
    damage(tmp_path / "base")
    with pytest.raises(ValueError, match=re.escape(f"--base {tmp_path / 'base'}: {expected}")):
        pretrained_base(tmp_path / "base", word_tokenizer, TINY_BASE, log=lambda line: None)


def test_mlan_train_reports_a_damaged_base_in_one_line(data, tmp_path, capsys):
    options = ["--base", str(tmp_path / "base"), "--base-steps", "2", "--steps", "2", "--no-plots"]
    train(data, tmp_path / "first", *options)
    (tmp_path / "base" / "base.json").write_text("{not json")
    status, message = fails(data, tmp_path / "second", capsys, *options)
    assert status == 2 and "base.json is not JSON" in message


def test_two_runs_asking_for_one_base_build_it_once(tmp_path, word_tokenizer, monkeypatch):
    """Two makers at once (threads: flock excludes open files, not processes): the second waits
    for the first, then reuses its base; before the lock it failed with "Directory not empty"."""
    import threading
    from mlan_train import base
    from test_base_pretrain import TINY as TINY_BASE
    built, original = [], base.pretrain_llama

    def counted(*args):
        built.append(threading.get_ident())
        return original(*args)
    monkeypatch.setattr(base, "pretrain_llama", counted)
    results, errors = [], []

    def make():
        try:
            results.append(base.pretrained_base(tmp_path / "base", word_tokenizer, TINY_BASE,
                                                log=lambda line: None))
        except Exception as error:               # reported below
            errors.append(error)
    threads = [threading.Thread(target=make) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(built) == 1
    assert sorted(record["reused"] for record in results) == [False, True]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base"]


# ---------------------------------------------------------------- tokenizer, full disk
@pytest.mark.parametrize("content, expected", [
    ("{not json", "unreadable"),
    ('{"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}',
     "tokenizer must map '<pad>' to id 0, got None"),
    (None, "not a regular file or a directory"),
])
def test_a_bad_tokenizer_file_is_one_line(data, tmp_path, capsys, content, expected):
    path = tmp_path / "tokenizer.json"
    if content is None:
        os.mkfifo(path)
    else:
        path.write_text(content)
    status, message = fails(data, tmp_path / "out", capsys, *SHORT, "--tokenizer", str(path))
    assert status == 2 and f"tokenizer {path}: {expected}" in message


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(data, tmp_path, capsys, monkeypatch):
    train(data, tmp_path, *SHORT, "--stop-after", "2")
    before = torch.load(tmp_path / "checkpoint" / STATE_NAME, weights_only=True)["step"]

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed "
                           "writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", full)
    status, message = fails(data, tmp_path, capsys, *SHORT, "--resume", str(tmp_path / "checkpoint"))
    monkeypatch.undo()
    assert status == 2 and f"saving the checkpoint {tmp_path / 'checkpoint'} failed" in message
    assert "the previous checkpoint is kept" in message
    assert before == 2 and torch.load(tmp_path / "checkpoint" / STATE_NAME, weights_only=True)["step"] == 2
    resumed = train(data, tmp_path, *SHORT, "--resume", str(tmp_path / "checkpoint"))
    assert len(resumed["loss"]) == 4
