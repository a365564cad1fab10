"""`mlan-train` / python/train_mixed.py: train a LaVIN-patched LLaMA + CLIP on an MLAN mixture.

    mlan-train --data data/synthetic --make-data --shares 0.5 0.875 --compare-backends
    torchrun --nproc_per_node=2 -m mlan_train.cli --data ... --steps 20
    mlan-train --llama ~/llama-7b-hf --clip ~/clip-vit-large-patch14 --data ~/llava/llava.json
               --image-folder ~/llava/images --eval-fraction 0.05 --predict questions.json

Writes OUT/run.json (OUT/share-S/run.json per share with --shares), loss.png, balance.png,
a checkpoint directory (adapters/ in safetensors + exact-resume state), and with several
shares OUT/results.json + OUT/shares.png; prints a results table.
"""
import dataclasses
import datetime
import gc
import json
import os
import statistics
import sys

import torch

from .base import with_pretrained_base
from .config import build_parser, config_from_args
from .preflight import check_device, check_paths, check_run_directory, run_lock
from .predict import write_predictions
from .report import plot_shares, plots_possible, write_run
from .signals import TrainingStopped
from .swap import find_checkpoint
from .throughput import backend_throughput
from .trainer import MixedTrainer

SWEEP_SHARES = (0.0, 0.5, 0.875, 1.0)


def init_distributed(config):
    """(rank, world_size); initializes torch.distributed under torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    rank = int(os.environ["RANK"])
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        config.device = f"cuda:{torch.cuda.current_device()}"
    elif not config.threads:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    # rank 0 writes checkpoints and plots while the others wait at a barrier: allow slow disks
    torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                         timeout=datetime.timedelta(minutes=60))
    return rank, world_size


def ensure_data(directory, rank, world_size):
    """Generate the synthetic task into `directory` unless train.jsonl is there (rank 0)."""
    if rank == 0 and not os.path.exists(os.path.join(directory, "train.jsonl")):
        from mlan_kernels.data.synthetic import make_synthetic
        print(f"generating the synthetic task into {directory} ...")
        make_synthetic(directory)
    if world_size > 1:
        torch.distributed.barrier()


def chance_levels(directory) -> dict:
    """{"text": p, "image": p, "tasks": {task: p}} from the synthetic data's meta.json
    (empty when absent)."""
    path = os.path.join(directory, "meta.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        meta = json.load(handle)
    return {**meta.get("chance", {}),
            "tasks": {name: task["chance"] for name, task in meta.get("tasks", {}).items()}}


def table_row(share, summary) -> dict:
    final = summary["final_eval"] or {}
    loss = summary["loss"]
    row = {"share": share,
           "text_accuracy": final.get("text", {}).get("accuracy"),
           "image_accuracy": final.get("image", {}).get("accuracy"),
           "final_loss": statistics.fmean(loss[-20:]),
           "tokens_per_s": summary["throughput"]["tokens_per_s"],
           "padding_ratio": summary["data"]["padding_ratio"],
           "image_token_share": summary["tokens"]["image_tokens"] / max(
               summary["tokens"]["image_tokens"] + summary["tokens"]["text_tokens"], 1),
           "kappa_ema": summary["kappa"][-1]["kappa_ema"] if summary["kappa"] else None,
           "probe_s": summary["probe_seconds_mean"],
           "peak_memory_mb": summary["peak_memory"]["bytes"] / 2**20,
           "parameters": summary["parameters"]}
    row["by_task"] = accuracy_by_task(final)
    for entry in summary.get("backends", []):
        row[f"fwd_bwd_tokens_per_s[{entry['backend']}={entry['resolved']}]"] = entry["tokens_per_s"]
    return row


def accuracy_by_task(final: dict) -> dict:
    """{task: accuracy} over both modalities of a final evaluation; a task name found in both
    (e.g. "all", for ids that name no task) is written "text all" / "image all", so neither
    modality's entry replaces the other's."""
    tasks = {modality: final.get(modality, {}).get("by_task", {}) for modality in ("text", "image")}
    shared = set(tasks["text"]) & set(tasks["image"])
    return {(f"{modality} {task}" if task in shared else task): accuracy
            for modality, entries in tasks.items() for task, accuracy in entries.items()}


def format_table(rows, chance) -> str:
    """A fixed-width text table of the runs (None -> "-")."""
    def cell(value, spec):
        return "-" if value is None else format(value, spec)
    backends = [key for key in rows[0] if key.startswith("fwd_bwd")]
    header = (f"{'share':>6} {'text acc':>9} {'image acc':>10} {'loss':>7} {'train tok/s':>12} "
              f"{'padding':>8} {'img tok':>8} {'kappa':>8} {'probe s':>8} {'peak MB':>8}"
              + "".join(f" {key.split('[')[1][:-1]:>22}" for key in backends))
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['share']:>6g} {cell(row['text_accuracy'], '.1%'):>9} "
            f"{cell(row['image_accuracy'], '.1%'):>10} {row['final_loss']:>7.4f} "
            f"{cell(row['tokens_per_s'], ',.0f'):>12} {row['padding_ratio']:>8.1%} "
            f"{row['image_token_share']:>8.1%} {cell(row['kappa_ema'], '.3g'):>8} "
            f"{cell(row['probe_s'], '.3f'):>8} {row['peak_memory_mb']:>8.0f}"
            + "".join(f" {cell(row[key], ',.0f'):>22}" for key in backends))
    tasks = chance.get("tasks", {})
    for row in rows:
        if row["by_task"]:
            lines.append(f"share {row['share']:g} by task: " + ", ".join(
                f"{task} {value:.0%}" + (f" (chance {tasks[task]:.0%})" if task in tasks else "")
                for task, value in row["by_task"].items()))
    for row in rows[:1]:
        trainable, total = row["parameters"]["trainable"], row["parameters"]["total"]
        lines.append(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")
    if chance:
        lines.append(f"chance level (exact match): text-only {chance.get('text', 0):.1%}, "
                     f"image-text {chance.get('image', 0):.1%}")
    if backends:
        lines.append("last columns: forward+backward tokens/s of the trained model per adapter "
                     "backend (auto = what the dispatcher picks)")
    return "\n".join(lines)


def run_directories(config) -> list:
    """The directories the runs of `config` write to (one per share with --shares)."""
    if not config.shares:
        return [config.out]
    return [os.path.join(config.out, f"share-{share:g}") for share in config.shares]


def prepare(argv):
    """Parse and check everything that can be checked before step 0 (ValueError otherwise)."""
    config = config_from_args(build_parser().parse_args(argv))
    if config.sweep and not config.shares:
        config.shares = list(SWEEP_SHARES)
    check_device(config.device)
    check_paths(config)
    for directory in [config.out] + (run_directories(config) if config.shares else []):
        check_run_directory(directory)
    return config


def main(argv=None) -> int:
    """Exit status 0; 2 for a user error (bad option, path, data, resume mismatch, --out in use
    by another run), 1 when training stops on a non-finite loss or skips every step
    (trainer.NonFiniteError); both print one line `mlan-train: error: ...` (MLAN_TRACEBACK=1
    raises instead, with the traceback). SIGTERM/SIGINT: a checkpoint after the current step,
    one line, status 128 + the signal number (signals.py)."""
    try:
        config = prepare(argv)
        with run_lock(config.out):
            return run(config)
    except TrainingStopped as stopped:
        if config.shares:
            stopped.resume = config.out           # a sweep resumes from its directory
        print(f"mlan-train: {stopped}", file=sys.stderr)
        return stopped.exit_status
    except (ValueError, OSError, FloatingPointError) as error:
        if os.environ.get("MLAN_TRACEBACK") == "1":
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"mlan-train: error: {message}", file=sys.stderr)
        return 1 if isinstance(error, FloatingPointError) else 2


def run(config) -> int:
    """Train every share of `config` (already checked by prepare) and print the table."""
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world_size = init_distributed(config)
    if config.make_data:
        ensure_data(config.data, rank, world_size)
    if config.base:
        config = with_pretrained_base(config, rank, world_size)
    shares = config.shares or [config.language_share]
    rows = []
    for share in shares:
        out = os.path.join(config.out, f"share-{share:g}") if config.shares else config.out
        resume = config.resume
        if config.shares and resume:     # --resume names the sweep's directory: each share's own
            resume = os.path.join(resume, f"share-{share:g}", "checkpoint")
            resume = resume if find_checkpoint(resume) else None
        run_config = dataclasses.replace(config, language_share=share, out=out, resume=resume)
        trainer = MixedTrainer(run_config, rank, world_size)
        summary = trainer.train(stop_after=config.stop_after)
        if rank != 0:
            continue
        if config.compare_backends:
            summary["backends"] = backend_throughput(trainer)
        write_run(summary, out, plots=config.plots)
        rows.append(table_row(share, summary))
        if config.predict:
            print(f"answers to {config.predict} in {write_predictions(trainer, config.predict, out)}")
    if rank == 0:
        chance = chance_levels(config.data)
        print(format_table(rows, chance))
        if config.shares:
            with open(os.path.join(config.out, "results.json"), "w", encoding="utf-8") as handle:
                json.dump({"rows": rows, "chance": chance}, handle, indent=1)
            if plots_possible(config.plots):
                plot_shares(rows, chance, os.path.join(config.out, "shares.png"))
        print(f"results in {config.out}")
    if world_size > 1:
        # DDP holds the process group: release it (and its gloo threads) before the teardown,
        # with every rank past its last collective; a rank whose DDP model outlived
        # destroy_process_group has aborted at exit ("terminate called without an active
        # exception"), mostly on a loaded machine
        del trainer
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
