"""What a `mlan-train` user gets from setting up and running a MixedTrainer (beyond one step,
which test_behaviour_trainer.py covers):

* --device auto picks CUDA when torch sees a GPU and the CPU otherwise; any other name is used as
  given;
* --aux-weight > 0 with more than one process is refused before anything is loaded;
* the optimizer is AdamW with β = (0.9, 0.95); the schedule and the κ monitor take the run's
  --min-lr-ratio, --probe-every and --kappa-* options (probes in eval mode);
* training runs under bf16 autocast on a GPU and as written on the CPU;
* each data file's load report (what load_records skipped, and why; what --max-length cut) is
  printed once when there is something to report, and kept for run.json; --max-image-pixels
  reaches the loader (0 = no limit); --image-size reaches every image and the vision tower;
* the batches are those of the MLAN samplers with the run's --language-share,
  --samples-per-epoch, --batch-size and --seed;
* train() with no arguments runs every step, evaluates and saves; the progress bar counts on
  from a resumed step and shows the loss and learning rate; a step's time leaves out its probe.
"""
import json
import os
import re
import shutil
import types
import warnings

import pytest
import torch

from mlan_kernels.data.dataset import InstructionDataset, split_by_modality
from mlan_kernels.data.records import load_records
from mlan_kernels.data.sampler import MixtureSampler, ModalityLengthBatchSampler
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
    message = ("--aux-weight > 0 runs in one process only (its gradient is not all-reduced "
               "across ranks)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        MixedTrainer(config, rank=1, world_size=2)


def test_the_optimizer_schedule_and_kappa_monitor_take_the_runs_options(data, tmp_path):
    """Each κ option differs from BalanceMonitor's own default, so a dropped one shows."""
    trainer = make_trainer(data, tmp_path, "--min-lr-ratio", "0.25", "--probe-every", "3",
                           "--kappa-eps", "1e-6", "--kappa-beta", "0.8", "--kappa-ema", "log",
                           "--kappa-min-kl", "1e-5", "--kappa-skip", "either")
    assert {group["betas"] for group in trainer.optimizer.param_groups} == {(0.9, 0.95)}
    assert trainer.scheduler.base_schedule.min_ratio == 0.25
    monitor = trainer.monitor
    assert (monitor.probe_every, monitor.beta, monitor.eps, monitor.probe_mode, monitor.ema,
            monitor.min_kl, monitor.skip) == (3, 0.8, 1e-6, "eval", "log", 1e-5, "either")


def test_training_autocasts_to_bf16_on_a_gpu_only(data, tmp_path):
    trainer = make_trainer(data, tmp_path)
    assert not isinstance(trainer.autocast(), torch.autocast)
    trainer.device = torch.device("cuda")                     # what a GPU run gets (not entered)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # "CUDA is not available" here
        context = trainer.autocast()
    assert isinstance(context, torch.autocast)
    assert (context.device, context.fast_dtype) == ("cuda", torch.bfloat16)


@pytest.mark.filterwarnings("ignore:.*skipping")
def test_each_files_load_report_is_printed_when_there_is_news_and_kept(data, tmp_path, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    with open(copy / "train.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{not json\n" + json.dumps({"id": "x", "conversations": []}) + "\n")
    capsys.readouterr()
    trainer = make_trainer(str(copy), tmp_path / "out", "--max-length", "16", "--allow-truncation")
    printed = capsys.readouterr().out.splitlines()
    expected = {name: load_records(copy / name)[1] for name in ("train.jsonl", "eval.jsonl")}
    reasons = {"not_json": 1, "empty_conversation": 1}
    assert expected["train.jsonl"].reasons == reasons and not expected["eval.jsonl"].skipped
    for name, report in expected.items():
        dataset = trainer.train_set if name == "train.jsonl" else trainer.eval_set
        assert trainer.load_reports[name] == {
            "loaded": report.loaded, "skipped": report.skipped, "reasons": report.reasons,
            "images": report.images, "truncated": dataset.truncated,
            "answers_truncated": dataset.answers_truncated,
            "unknown_tokens": {"template": 0, "answers": 0}}
        truncated = (f"{name}: {dataset.truncated} of {len(dataset)} samples truncated to "
                     f"--max-length 16 tokens")
        assert printed.count(truncated) == (1 if dataset.truncated else 0), printed
    assert trainer.train_set.truncated > 0
    line = (f"data: {expected['train.jsonl'].describe('train.jsonl')}; "
            f"{expected['eval.jsonl'].describe('eval.jsonl')}")
    assert "2 skipped (empty_conversation 1, not_json 1); eval.jsonl: " in line
    assert printed.count(line) == 1, printed


@pytest.mark.filterwarnings("ignore:.*skipping")
@pytest.mark.parametrize("limit, skipped", [(16, True), (0, False)])
def test_max_image_pixels_reaches_the_loader(data, tmp_path, limit, skipped):
    trainer = make_trainer(data, tmp_path, "--max-image-pixels", str(limit), "--language-share", "1")
    images = sum(map(bool, InstructionDataset(load_records(
        os.path.join(data, "train.jsonl"))[0], trainer.tokenizer).has_image))
    report = trainer.load_reports["train.jsonl"]
    assert report["skipped"] == (images if skipped else 0) and images > 0, report


def test_image_size_reaches_every_image_and_the_vision_tower(data, tmp_path):
    trainer = make_trainer(data, tmp_path, "--image-size", "12", "--steps", "2",
                           "--probe-every", "0")
    for dataset in (trainer.train_set, trainer.eval_set):
        shapes = {tuple(dataset[i]["pixel_values"].shape) for i in range(len(dataset))
                  if dataset[i]["has_image"]}
        assert shapes == {(3, 12, 12)}, shapes
    trainer.train(stop_after=1)                   # the tiny CLIP takes 12-pixel images
    assert len(trainer.history["loss"]) == 1


def test_the_batches_are_the_mlan_samplers_with_the_runs_options(data, tmp_path):
    trainer = make_trainer(data, tmp_path, "--language-share", "0.25", "--samples-per-epoch",
                           "40", "--batch-size", "2", "--seed", "7")
    text, image = split_by_modality(trainer.train_set)
    expected = ModalityLengthBatchSampler(
        MixtureSampler(text, image, 0.25, num_samples=40, seed=7), trainer.train_set.lengths,
        trainer.train_set.has_image, 2, seed=7)
    assert list(trainer.batches) == list(expected)
    assert sum(map(len, expected)) == 40


def test_train_without_arguments_runs_every_step_then_evaluates_and_saves(data, tmp_path):
    trainer = make_trainer(data, tmp_path, "--steps", "3", "--probe-every", "0")
    summary = trainer.train()
    assert trainer.step == 3 and len(summary["loss"]) == 3 and len(summary["lr"]) == 3
    assert [record["step"] for record in summary["eval"]] == [3]
    assert summary["rank_weight_max_diff"] == 0.0                 # one process: nothing to differ
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


def test_a_steps_time_leaves_out_its_probes_time(data, tmp_path, monkeypatch):
    """history["step_seconds"] (run.json's throughput) is each step's wall time minus the time
    its κ probe took; steps without a probe count whole. A fake clock: every step takes 1 s,
    every probe reports 0.25 s."""
    import mlan_train.trainer as trainer_module
    clock = [100.0]
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    trainer = make_trainer(data, tmp_path, "--steps", "4", "--probe-every", "2", "--probe-start",
                           "0", "--probe-on", "any")
    real_step = trainer.train_step

    def step_of_one_second(batch_iter, counter):
        loss, record = real_step(batch_iter, counter)
        clock[0] += 1.0
        return loss, None if record is None else dict(record, probe_seconds=0.25)
    trainer.train_step = step_of_one_second
    trainer.train()
    probed = [record["step"] for record in trainer.history["kappa"]]
    assert probed == [0, 2]
    assert trainer.history["step_seconds"] == [0.75 if step in probed else 1.0 for step in range(4)]
