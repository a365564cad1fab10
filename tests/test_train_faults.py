"""mlan-train under hostile options and faults: resume refuses every changed option outside
the documented list, bad options and paths fail before step 0 as one line with exit status 2,
non-finite values stop the run (or skip the step), and a crash between any two filesystem
operations of a checkpoint save never loses the newest complete checkpoint."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mlan_train import state as state_module
from mlan_train import swap
from mlan_train import trainer as trainer_module
from mlan_train.config import build_parser, config_from_args
from mlan_train.state import RESUME_MAY_CHANGE, STATE_NAME, TRAINABLE_NAME
from mlan_train.trainer import MixedTrainer

from test_train_mixed import TINY, data, fails, train  # noqa: F401 (data is a fixture)

SHORT = ["--steps", "4", "--no-plots", "--language-share", "0.5"]


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    """A run stopped after 2 of 4 steps: (its --out, its checkpoint)."""
    out = tmp_path_factory.mktemp("stopped")
    train(data, out, *SHORT, "--stop-after", "2")
    return out, out / "checkpoint"


# ---------------------------------------------------------------- resume
CHANGED = [("--temperature", "5.0", "10.0"), ("--adapter-scale", "0.5", "1.0"),
           ("--adapter-dropout", "0.0", "0.1"), ("--min-lr-ratio", "0.1", "0.0"),
           ("--max-grad-norm", "0.5", "1.0"), ("--lr", "0.01", "0.002"),
           ("--weight-decay", "0.1", "0.02"), ("--backend", "reference", "'auto'"),
           ("--nan-policy", "skip-step", "'error'"), ("--eval-samples", "4", "8")]


@pytest.mark.parametrize("option, value, saved", CHANGED, ids=[c[0] for c in CHANGED])
def test_resume_refuses_a_changed_option_naming_both_values(data, stopped, tmp_path, capsys,
                                                           option, value, saved):
    _, checkpoint = stopped
    status, message = fails(data, tmp_path, capsys, *SHORT, option, value,
                            "--resume", str(checkpoint))
    assert status == 2 and f"{option}: checkpoint {saved}, this run " in message
    assert "only --out, --resume, --eval-every" in message
    assert not (tmp_path / "checkpoint").exists()


def test_resume_names_every_differing_option(data, stopped, tmp_path, capsys):
    _, checkpoint = stopped
    _, message = fails(data, tmp_path, capsys, *SHORT, "--temperature", "5", "--lr", "0.01",
                       "--resume", str(checkpoint))
    assert "--temperature: checkpoint 10.0, this run 5.0" in message
    assert "--lr: checkpoint 0.002, this run 0.01" in message


def test_resume_accepts_the_documented_options_and_records_what_ran(data, stopped, tmp_path):
    out, checkpoint = stopped
    assert {"eval_every", "log_every", "save_every", "out", "threads"} <= set(RESUME_MAY_CHANGE)
    run = train(data, tmp_path, *SHORT, "--eval-every", "3", "--log-every", "2",
                "--save-every", "1", "--threads", str(torch.get_num_threads()),
                "--resume", str(checkpoint))
    saved = torch.load(checkpoint / STATE_NAME, weights_only=True)["config"]
    for key, value in run["config"].items():
        if key not in RESUME_MAY_CHANGE:
            assert saved[key] == value, key           # what ran = what the checkpoint trained
    assert run["config"]["device"] == "cpu"           # "auto" resolved
    assert run["resumed"] == [{"checkpoint": str(checkpoint), "step": 2}]
    assert len(run["loss"]) == 4 and [e["step"] for e in run["eval"]] == [3, 4]


def test_resume_refuses_a_tampered_step_or_nan_weights(data, stopped, tmp_path, capsys):
    _, checkpoint = stopped
    from safetensors.torch import load_file, save_file
    for step, expected in ((99, "trainer step 99 is not an int in [0, --steps 4]"),
                           (-5, "trainer step -5")):
        copy = tmp_path / f"step{step}"
        shutil.copytree(checkpoint, copy)
        state = torch.load(copy / STATE_NAME, weights_only=True)
        torch.save(dict(state, step=step), copy / STATE_NAME)
        status, message = fails(data, tmp_path / "out", capsys, *SHORT, "--resume", str(copy))
        assert status == 2 and expected in message
    copy = tmp_path / "nan"
    shutil.copytree(checkpoint, copy)
    tensors = load_file(copy / TRAINABLE_NAME)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, copy / TRAINABLE_NAME)
    status, message = fails(data, tmp_path / "out", capsys, *SHORT, "--resume", str(copy))
    assert status == 2 and f"parameter {name} holds non-finite values" in message


# ---------------------------------------------------------------- fail fast, one line, exit 2
BAD_OPTIONS = [
    (["--lr", "inf"], "--lr must be finite and > 0, got inf"),
    (["--lr", "nan"], "--lr must be finite"),
    (["--weight-decay", "nan"], "--weight-decay must be finite and >= 0"),
    (["--temperature", "0"], "--temperature must be finite and > 0"),
    (["--adapter-dropout", "1"], "--adapter-dropout must be finite and in [0, 1)"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio must be finite and in [0, 1]"),
    (["--max-grad-norm", "inf"], "--max-grad-norm must be finite"),
    (["--kappa-eps", "nan"], "--kappa-eps must be finite"),
    (["--seed", str(2**63)], "--seed must be in [0, 2^32)"),
    (["--seed", "-1"], "--seed must be in [0, 2^32)"),
    (["--dim", "100", "--heads", "3"], "--dim 100 must be --heads 3 x an even head size"),
    (["--image-size", "7", "--patch-size", "14"], "--image-size 7 must be a positive multiple of --patch-size 14"),
    (["--rank", "6", "--groups", "4"], "--groups 4 must divide --rank 6"),
    (["--backend", "fast"], "--backend must be one of"),
    (["--nan-policy", "ignore"], "--nan-policy must be 'error' or 'skip-step'"),
    (["--device", "tpu"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["--max-length", "1"], "--max-length must be >= 2"),
    (["--llama", "/nonexistent/llama"], "--llama /nonexistent/llama: expected a local HuggingFace model directory"),
    (["--clip", "/nonexistent/clip"], "--clip /nonexistent/clip: expected a local"),
    (["--tokenizer", "/nonexistent/tok.json"], "--tokenizer /nonexistent/tok.json: no such file"),
    (["--resume", "/nonexistent/checkpoint"], "--resume /nonexistent/checkpoint: no complete checkpoint"),
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--max-length", "3"], "--max-length 3 cuts answer tokens of 100.0% of train.jsonl's records"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append((["--device", "cuda"], "--device cuda: no CUDA device is available"))


@pytest.mark.parametrize("options, expected", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_line_with_exit_status_2(data, tmp_path, capsys, monkeypatch,
                                                    options, expected):
    steps = []
    monkeypatch.setattr(MixedTrainer, "train_step", lambda self, *a: steps.append(1))
    status, message = fails(data, tmp_path, capsys, "--steps", "3", *options)
    assert status == 2 and expected in message
    assert not steps                                 # refused before step 0


def test_out_that_cannot_hold_a_run_fails_before_step_0(data, tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(MixedTrainer, "__init__", lambda self, *a: built.append(1))
    (tmp_path / "file").write_text("x")
    _, message = fails(data, tmp_path / "file", capsys, "--steps", "3")
    assert f"--out {tmp_path / 'file'}: exists and is not a directory" in message
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint").write_text("x")
    _, message = fails(data, tmp_path / "run", capsys, "--steps", "3")
    assert "checkpoint exists and is not a directory" in message
    _, message = fails(data, tmp_path / "file" / "below", capsys, "--steps", "3")
    assert "not a writable directory" in message
    assert not built


def test_console_script_errors_are_one_line_exit_2(tmp_path):
    path = os.path.join(os.path.dirname(sys.executable), "mlan-train")
    result = subprocess.run([path, "--lr", "inf", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == "mlan-train: error: --lr must be finite and > 0, got inf"


def test_allow_truncation_overrides_the_share_check(data, tmp_path):
    run = train(data, tmp_path, *SHORT, "--max-length", "12", "--allow-truncation")
    assert run["data"]["files"]["train.jsonl"]["answers_truncated"] > 0


# ---------------------------------------------------------------- non-finite values
def poison_gradients_at(monkeypatch, step):
    """Make the gradient of one parameter nan on the `step`-th optimizer step (0-based)."""
    original, calls = trainer_module.scale_grads_, []

    def poisoned(groups, *args, **kwargs):
        if len(calls) == step:
            next(p for p in groups[1] if p.grad is not None).grad.view(-1)[0] = float("nan")
        calls.append(1)
        return original(groups, *args, **kwargs)
    monkeypatch.setattr(trainer_module, "scale_grads_", poisoned)


def test_nan_gradient_stops_the_run_naming_the_step(data, tmp_path, capsys, monkeypatch):
    poison_gradients_at(monkeypatch, 2)
    status, message = fails(data, tmp_path, capsys, *SHORT, "--save-every", "1")
    assert status == 1 and "step 2: non-finite loss" in message and "--nan-policy skip-step" in message
    state = torch.load(tmp_path / "checkpoint" / STATE_NAME, weights_only=True)
    assert state["step"] == 2                        # the last good checkpoint is kept


def test_nan_policy_skip_step_skips_the_update(data, tmp_path, monkeypatch):
    poison_gradients_at(monkeypatch, 1)
    run = train(data, tmp_path, *SHORT, "--nan-policy", "skip-step")
    assert run["skipped_steps"] == [1] and len(run["loss"]) == 4
    from safetensors.torch import load_file
    weights = load_file(tmp_path / "checkpoint" / TRAINABLE_NAME)
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


# ---------------------------------------------------------------- crash-safe checkpoint swap
class Crash(Exception):
    pass


def crash_at(monkeypatch, k):
    """Raise Crash instead of the k-th filesystem operation of a save (k = None: count only);
    returns the list of operations performed."""
    done = []

    def wrap(module, name):
        original = getattr(module, name)

        def operation(*args, **kwargs):
            if k is not None and len(done) == k:
                raise Crash(f"{name} #{k}")
            done.append(name)
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, operation)
    for module, name in ((swap.os, "replace"), (swap.os, "remove"), (swap.shutil, "rmtree"),
                         (state_module, "mark_complete"), (state_module.os, "makedirs")):
        wrap(module, name)
    return done


def saved_step(directory):
    found = swap.find_checkpoint(directory)
    return None if found is None else torch.load(os.path.join(found, STATE_NAME),
                                                 weights_only=True)["step"]


@pytest.fixture(scope="module")
def trainer(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("swap")
    config = config_from_args(build_parser().parse_args(["--data", data, "--out", str(out), *TINY,
                                                         *SHORT]))
    return MixedTrainer(config)


def save_at(trainer, directory, step):
    trainer.step = step
    trainer.save(str(directory))


def save_crashing(monkeypatch, k, trainer, directory, step):
    """save_at with a crash at the k-th filesystem operation (none when k is past the last)."""
    with monkeypatch.context() as patch:
        crash_at(patch, k)
        try:
            save_at(trainer, directory, step)
        except Crash:
            pass


def test_a_save_performs_the_expected_operations(trainer, tmp_path, monkeypatch):
    save_at(trainer, tmp_path / "ckpt", 1)
    done = crash_at(monkeypatch, None)
    save_at(trainer, tmp_path / "ckpt", 2)
    assert "mark_complete" in done and done.count("replace") == 2 and len(done) >= 6
    assert sorted(os.listdir(tmp_path)) == ["ckpt"] and saved_step(tmp_path / "ckpt") == 2


def test_a_crash_at_any_point_of_two_saves_keeps_the_newest_complete_checkpoint(
        trainer, tmp_path, monkeypatch):
    """Crash save 2 at operation k1, then (recovering first) save 3 at operation k2: after
    every crash some complete checkpoint exists and it is never older than before the save."""
    def operations(root, step):
        """The operations a save at `root` performs (on a copy)."""
        copy = tmp_path / "count"
        shutil.copytree(root, copy)
        with monkeypatch.context() as patch:
            done = crash_at(patch, None)
            save_at(trainer, copy / "ckpt", step)
        shutil.rmtree(copy)
        return len(done)

    base = tmp_path / "base"
    save_at(trainer, base / "ckpt", 1)
    for k1 in range(operations(base, 2) + 1):
        root = tmp_path / f"k{k1}"
        shutil.copytree(base, root)
        save_crashing(monkeypatch, k1, trainer, root / "ckpt", 2)
        first = saved_step(root / "ckpt")
        assert first in (1, 2), (k1, os.listdir(root))
        for k2 in range(operations(root, 3) + 1):
            again = tmp_path / f"k{k1}-{k2}"
            shutil.copytree(root, again)
            save_crashing(monkeypatch, k2, trainer, again / "ckpt", 3)
            second = saved_step(again / "ckpt")
            assert second is not None and second >= first, (k1, k2, os.listdir(again))
            save_at(trainer, again / "ckpt", 4)           # and the next save cleans up
            assert sorted(os.listdir(again)) == ["ckpt"] and saved_step(again / "ckpt") == 4
            shutil.rmtree(again)


def test_resume_after_a_crash_between_the_two_renames(data, tmp_path, capsys):
    """Only checkpoint.old (+ checkpoint.tmp) left: --resume finds the newest complete one."""
    straight = train(data, tmp_path / "straight", *SHORT)
    train(data, tmp_path / "split", *SHORT, "--stop-after", "2")
    checkpoint = tmp_path / "split" / "checkpoint"
    os.replace(checkpoint, str(checkpoint) + ".old")
    os.makedirs(str(checkpoint) + ".tmp")                  # an incomplete new one
    resumed = train(data, tmp_path / "split", *SHORT, "--resume", str(checkpoint))
    assert resumed["loss"] == straight["loss"]
    assert resumed["resumed"] == [{"checkpoint": str(checkpoint) + ".old", "step": 2}]
    assert sorted(os.listdir(tmp_path / "split")) == [".mlan-train.lock", "checkpoint", "run.json"]
