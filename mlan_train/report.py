"""run.json, plots and the results table of the training program."""
import datetime
import json
import os
import platform
import resource
import statistics

import torch


def peak_memory(device) -> dict:
    """{"bytes", "kind"}: torch.cuda.max_memory_allocated on GPU, else the process peak RSS."""
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device), "kind": "cuda max_memory_allocated"}
    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "kind": "process peak RSS (CPU)"}


def environment(device, world_size) -> dict:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "world_size": world_size,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def run_summary(trainer, totals: dict) -> dict:
    """Everything run.json holds (docs/training.md, "Outputs")."""
    history, tokens = trainer.history, totals["tokens"]
    seen = tokens["text_tokens"] + tokens["image_tokens"]
    train_seconds = sum(history["step_seconds"])
    probes = history["kappa"]
    from .model import model_record
    model = model_record(trainer.module, trainer.config)
    sizes = {key: value for key, value in model.items() if key not in ("llama", "clip", "vocab_size", "image_tokens")}
    return {
        "config": trainer.config_dict() | sizes,      # the models' real sizes, not the tiny defaults
        "model": model | {"tokenizer": repr(trainer.tokenizer), "template": trainer.train_set.template.name,
                          "image_processor": type(trainer.image_processor).__name__
                          if trainer.image_processor is not None else "built-in resize + CLIP normalization"},
        "environment": environment(trainer.device, trainer.world_size),
        "data": {"train_samples": len(trainer.train_set), "eval_samples": len(trainer.eval_set),
                 "padding_ratio": tokens["padded_tokens"] / max(tokens["padded_tokens"] + tokens["text_tokens"], 1),
                 "epoch_padding_ratio": trainer.batches.padding_ratio(),
                 "image_errors": trainer.train_set.image_errors, "files": trainer.load_reports},
        "tokens": tokens,
        "parameters": {"trainable": sum(p.numel() for p in trainer.module.parameters() if p.requires_grad),
                       "total": sum(p.numel() for p in trainer.module.parameters())},
        "loss": totals["loss"],
        "lr": history["lr"],
        "eval": history["eval"],
        "final_eval": history["eval"][-1] if history["eval"] else None,
        "throughput": {"tokens_per_s": seen / train_seconds if train_seconds else None,
                       "train_seconds": train_seconds,
                       "median_step_seconds": statistics.median(history["step_seconds"])},
        "peak_memory": peak_memory(trainer.device),
        "kappa": probes,
        "probe_seconds_mean": statistics.fmean([r["probe_seconds"] for r in probes]) if probes else None,
        "rank_weight_max_diff": totals["rank_weight_max_diff"],
        "skipped_steps": history.get("skipped_steps", []),     # --nan-policy skip-step
        "resumed": history.get("resumed", []),                 # [{"checkpoint", "step"}]
    }


def plots_possible(plots: bool) -> bool:
    """`plots`, unless matplotlib cannot be imported: then one line says the plots are skipped
    (matplotlib is not a dependency of the program, only of the [bench] extra)."""
    if not plots:
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib, or --no-plots)")
        return False
    return True


def write_run(summary: dict, out_dir, plots=True) -> list:
    """Write run.json (+ loss.png, balance.png when plots and matplotlib is there) to out_dir;
    returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "run.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    written = [path]
    if plots_possible(plots):
        written.append(plot_loss(summary, os.path.join(out_dir, "loss.png")))
        if summary["kappa"]:
            from mlan_kernels.training.plot import plot_balance
            written.append(str(plot_balance(summary["kappa"], os.path.join(out_dir, "balance.png"))))
    return written


def plot_loss(summary: dict, output) -> str:
    """Training loss (raw and a 20-step moving mean) and the learning rate per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    loss = summary["loss"]
    window = 20
    smooth = [statistics.fmean(loss[max(0, i - window + 1):i + 1]) for i in range(len(loss))]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(loss, alpha=0.3, label="loss")
    top.plot(smooth, label=f"mean of {window}")
    top.set_ylabel("train loss (answer tokens)")
    top.legend(loc="best")
    bottom.plot(summary["lr"])
    bottom.set_ylabel("learning rate (language side)")
    bottom.set_xlabel("step")
    figure.suptitle(f"language share {summary['config']['language_share']:g}")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return str(output)


def plot_shares(rows: list, chance: dict, output) -> str:
    """Held-out accuracy per modality vs language share (one bar pair per run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shares = [f"{row['share']:g}" for row in rows]
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, modality in ((-width / 2, "text"), (width / 2, "image")):
        values = [row.get(f"{modality}_accuracy") or 0.0 for row in rows]
        axis.bar([i + offset for i in range(len(rows))], values, width, label=f"{modality}-only" if modality == "text" else "image-text")
        if chance.get(modality) is not None:
            axis.axhline(chance[modality], linestyle="--", linewidth=0.8,
                         color="C0" if modality == "text" else "C1")
    axis.set_xticks(range(len(rows)), shares)
    axis.set_xlabel("language share")
    axis.set_ylabel("held-out exact-match accuracy")
    axis.set_ylim(0, 1)
    axis.legend(loc="best")
    axis.set_title("MLAN mixtures (dashed: chance)")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return str(output)
