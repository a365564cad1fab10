"""The mixed-modality training program (mlan_train): learning, exact resume,
DDP on gloo with 2 processes, sharded evaluation, local HF checkpoints, option errors. Tiny models, tiny data."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from mlan_kernels.data.dataset import split_by_modality
from mlan_kernels.data.synthetic import make_synthetic
from mlan_train.cli import main
from mlan_train.config import build_parser, config_from_args
from mlan_train.evaluate import evaluation_counts, merge_counts, summarize_counts
from mlan_train.trainer import MixedTrainer, task_of

TINY = ["--dim", "32", "--layers", "1", "--heads", "2", "--clip-dim", "32", "--clip-layers", "4",
        "--batch-size", "4", "--warmup-steps", "1", "--no-progress", "--eval-samples", "8",
        "--probe-every", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    make_synthetic(directory, train_size=160, eval_size=32, seed=3)
    return str(directory)


def train(data, out, *extra):
    assert main(["--data", data, "--out", str(out), *TINY, *extra]) == 0
    with open(os.path.join(out, "run.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_short_run_loss_decreases_and_reports(data, tmp_path):
    run = train(data, tmp_path, "--steps", "40", "--lr", "1e-2", "--language-share", "0.5",
                "--batch-size", "8")
    loss = run["loss"]
    assert len(loss) == 40 and all(value == value for value in loss)
    assert sum(loss[-8:]) / 8 < 0.7 * sum(loss[:8]) / 8
    final = run["final_eval"]
    assert set(final) == {"step", "text", "image"} and final["step"] == 40
    assert 0.0 <= final["text"]["accuracy"] <= 1.0 and final["image"]["samples"] == 8
    tokens = run["tokens"]
    assert tokens["samples_text"] + tokens["samples_image"] == 40 * 8
    assert tokens["image_tokens"] == tokens["samples_image"] * 1      # K = 4 blocks / 4
    probes = run["kappa"]                    # probe_on="image": due probes wait for image batches
    assert probes and all(r["image_batch"] == 1.0 and r["kappa"] > 0 for r in probes)
    assert 0.0 <= run["data"]["padding_ratio"] < 1.0
    for name in ("loss.png", "balance.png", "checkpoint/adapters/adapter_model.safetensors"):
        assert os.path.getsize(tmp_path / name) > 0


def test_resume_gives_the_same_losses_as_one_run(data, tmp_path):
    options = ["--steps", "6", "--balance-alpha", "0.5", "--language-share", "0.5", "--no-plots"]
    straight = train(data, tmp_path / "straight", *options)
    first = train(data, tmp_path / "split", *options, "--stop-after", "3")
    assert len(first["loss"]) == 3 and first["final_eval"] is None
    resumed = train(data, tmp_path / "split", *options,
                    "--resume", str(tmp_path / "split" / "checkpoint"))
    assert resumed["loss"] == straight["loss"]
    assert [r["kappa"] for r in resumed["kappa"]] == [r["kappa"] for r in straight["kappa"]]
    from safetensors.torch import load_file
    a = load_file(tmp_path / "straight" / "checkpoint" / "trainable.safetensors")
    b = load_file(tmp_path / "split" / "checkpoint" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fails(data, out, capsys, *extra):
    """(exit status, the one stderr line) of a run that must fail."""
    capsys.readouterr()
    status = main(["--data", data, "--out", str(out), *TINY, *extra])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()          # transformers may draw a loading bar before it
    errors = [line for line in lines if line.startswith("mlan-train: error: ")]
    assert status != 0 and len(errors) == 1 and lines[-1] == errors[0], lines
    assert "Traceback" not in err
    return status, errors[0]


@pytest.mark.parametrize("change, key", [(("--language-share", "0.5"), "--language-share"),
                                         (("--grad-accum", "2"), "--grad-accum")])
def test_resume_rejects_a_changed_option(data, tmp_path, capsys, change, key):
    train(data, tmp_path, "--steps", "4", "--stop-after", "2", "--no-plots")
    status, message = fails(data, tmp_path, capsys, "--steps", "4", "--no-plots", *change,
                            "--resume", str(tmp_path / "checkpoint"))
    assert status == 2 and key in message


def test_periodic_checkpoint_resumes_with_full_history(data, tmp_path, monkeypatch):
    """A --save-every checkpoint (not the final one) holds the token counts so far, and a
    resumed finished run is not evaluated twice."""
    import shutil
    from mlan_train import trainer as trainer_module
    original = trainer_module.save_checkpoint

    def snapshot(directory, trainer, rank=0, world_size=1):
        original(directory, trainer, rank, world_size)
        if trainer.step == 3 and not (tmp_path / "snap").exists():
            shutil.copytree(directory, tmp_path / "snap")

    options = ["--steps", "6", "--save-every", "3", "--no-plots", "--language-share", "0.5"]
    monkeypatch.setattr(trainer_module, "save_checkpoint", snapshot)
    straight = train(data, tmp_path / "a", *options)
    monkeypatch.undo()
    resumed = train(data, tmp_path / "b", *options, "--resume", str(tmp_path / "snap"))
    assert resumed["loss"] == straight["loss"] and resumed["tokens"] == straight["tokens"]
    again = train(data, tmp_path / "b", *options, "--resume", str(tmp_path / "b" / "checkpoint"))
    assert [entry["step"] for entry in again["eval"]] == [6]


def test_a_modality_that_never_fills_a_batch_is_an_error(data, tmp_path, capsys):
    status, message = fails(data, tmp_path, capsys, "--steps", "3", "--batch-size", "100",
                            "--language-share", "0.5")
    assert status == 2 and re.search("--batch-size 100 .* never fill one global batch", message)


def test_ddp_two_processes_on_gloo_stay_in_sync(data, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mlan_train.cli", "--data", data, "--out", str(tmp_path),
               *TINY, "--steps", "4", "--language-share", "0.5", "--no-plots", "--grad-accum", "2",
               "--balance-alpha", "0.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["world_size"] == 2
    assert run["rank_weight_max_diff"] == 0.0
    tokens = run["tokens"]
    assert tokens["samples_text"] + tokens["samples_image"] == 4 * 2 * 4 * 2   # steps·accum·batch·ranks
    final = run["final_eval"]                 # sharded over the ranks, merged: every sample once
    assert final["text"]["samples"] == final["image"]["samples"] == 8


def test_sharded_evaluation_equals_one_process(data, tmp_path):
    """What each DDP rank evaluates (every world_size-th held-out sample), merged, equals one
    process evaluating everything: same per-task tallies, same token loss (batching differs)."""
    config = config_from_args(build_parser().parse_args(
        ["--data", data, "--out", str(tmp_path), *TINY, "--steps", "30", "--no-plots"]))
    trainer = MixedTrainer(config)
    trainer.train()
    text, image = split_by_modality(trainer.eval_set)
    def counts(text_indices, image_indices):
        return evaluation_counts(trainer.module, trainer.eval_set,
                                 {"text": text_indices, "image": image_indices}, 3, trainer.device,
                                 trainer.tokenizer.pad_id, trainer.autocast, group_of=task_of)
    full = counts(text, image)
    merged = merge_counts([counts(text[rank::3], image[rank::3]) for rank in range(3)])
    for modality in ("text", "image"):
        assert merged[modality]["by_task"] == full[modality]["by_task"]
        assert merged[modality]["tokens"] == full[modality]["tokens"] > 0
        assert merged[modality]["loss_sum"] == pytest.approx(full[modality]["loss_sum"], rel=1e-5)
    summary = summarize_counts(full)
    assert summary["text"]["samples"] == len(text) and summary["image"]["samples"] == len(image)
    assert summary["text"]["loss"] == pytest.approx(full["text"]["loss_sum"] / full["text"]["tokens"])


def test_local_hf_checkpoints_train_only_adapters(data, tmp_path):
    from mlan_kernels.data.tokenizer import WordTokenizer
    from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama
    vocab = WordTokenizer.load(os.path.join(data, "tokenizer.json")).vocab_size
    llama = tiny_llama(seed=5, hidden_size=32, layers=1, heads=2, vocab_size=vocab)
    clip = tiny_clip(seed=6, hidden_size=32, layers=4, heads=2, image_size=28, patch_size=7)
    llama.save_pretrained(tmp_path / "llama")
    clip.save_pretrained(tmp_path / "clip")
    run = train(data, tmp_path / "run", "--steps", "3", "--no-plots", "--llama",
                str(tmp_path / "llama"), "--clip", str(tmp_path / "clip"))
    assert run["config"]["train_base"] is False
    from safetensors.torch import load_file
    trained = load_file(tmp_path / "run" / "checkpoint" / "trainable.safetensors")
    assert trained and all("adapter" in name or name.startswith(("neck.", "modality_embedding."))
                           for name in trained)
    assert any(not torch.equal(trained[name], torch.zeros_like(trained[name]))
               for name in trained if name.endswith("up.weight"))   # LaVIN init is zero


def test_small_vocabulary_checkpoint_is_rejected(data, tmp_path, capsys):
    from mlan_kernels.integrations.tiny import tiny_llama
    tiny_llama(hidden_size=32, layers=1, heads=2, vocab_size=8).save_pretrained(tmp_path / "llama")
    status, message = fails(data, tmp_path / "run", capsys, "--steps", "2", "--llama",
                            str(tmp_path / "llama"))
    assert status == 2 and "vocab_size 8 <" in message


@pytest.mark.parametrize("option, value, message", [
    ("--language-share", "1.5", "--language-share must be finite and in \\[0, 1\\]"),
    ("--warmup-steps", "100", "--warmup-steps must be in \\[0, steps\\)"),
    ("--clip-layers", "6", "--clip-layers must be a multiple of 4"),
    ("--log-every", "0", "--log-every must be >= 1"),
    ("--eval-samples", "-1", "--eval-samples must be > 0"),
])
def test_bad_options_name_the_option(option, value, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(build_parser().parse_args(["--steps", "100", option, value]))


def test_fsdp2_example_trains_on_gloo():
    """python/example_fsdp2.py: fully_shard per decoder/encoder layer + root, 2 CPU ranks."""
    script = os.path.join(os.path.dirname(__file__), "..", "python", "example_fsdp2.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               script, "--steps", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "FSDP2 loss went down" in result.stdout
    assert "(image)" in result.stdout and "(text)" in result.stdout


def test_probe_on_any_follows_the_schedule(data, tmp_path):
    run = train(data, tmp_path, "--steps", "7", "--probe-on", "any", "--probe-every", "3", "--probe-start", "0",
                "--no-plots", "--language-share", "0.5")
    assert [r["step"] for r in run["kappa"]] == [0, 3, 6]
    assert {r["image_batch"] for r in run["kappa"]} <= {0.0, 1.0}


def test_console_scripts_are_installed():
    """pyproject's [project.scripts]: mlan-train and mlan-bench land next to the interpreter."""
    bin_dir = os.path.dirname(sys.executable)
    for name in ("mlan-train", "mlan-bench"):
        path = os.path.join(bin_dir, name)
        assert os.path.exists(path), f"{name} not installed in {bin_dir} (reinstall the package)"
        result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage" in result.stdout.lower(), result.stderr[-500:]
