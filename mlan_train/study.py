"""The κ-scheduling study (issue 18, ours): seeds × α × λ × language shares of `mlan-train` on the
frozen stage-1 base, summarised as mean ± std over seeds.

    python python/study_balance.py --data data/synthetic --base runs/base --out runs/study \\
        --seeds 0 1 2 --alphas 0 0.5 --aux-weights 0 10 --shares 0.5 0.875 --jobs 2 \\
        --json benchmarks/results/balance-study.json --png benchmarks/results/balance-study.png

Each run is `mlan-train` with the study's defaults (STUDY_DEFAULTS) and every option not known
here passed through, e.g. `--steps 400`. With --base the base is made (or reused) once, before
any run, and every run reads it as --llama/--clip (so that parallel runs never race to make
it; its seed is --base-seed, the runs' --seed is stage 2's). --jobs N > 1 runs N `mlan-train` processes at a
time (OMP_NUM_THREADS=1 each); --jobs 1 runs them in this process. The JSON holds every run
(with a digest of its loss trace, so that two machines can be compared bit for bit) and the
groups' means and standard deviations; `python -m mlan_bench.render` renders it (the README's
study table). `make demo` is this program with --kind demo: α = λ = 0, seeds in parallel, and
the demo's table (per-task mean ± std over seeds, then every seed).
"""
import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from mlan_kernels.help_format import DefaultsHelpFormatter

# The study's mlan-train settings unless given: the demo's stage 2 at half its steps (1,500, the
# study of record; 24 runs of 3,000 would take ~45 min), without plots or progress bars.
STUDY_DEFAULTS = ["--steps", "1500", "--warmup-steps", "40", "--lr", "1e-2", "--no-plots",
                  "--no-progress", "--threads", "1"]
KINDS = ("balance-study", "demo")
TASKS = ("colour", "shape", "side", "add", "bigger", "repeat")


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter,
        epilog="Every other option goes to each mlan-train run (mlan-train --help); the study's "
               "own defaults for them: " + " ".join(STUDY_DEFAULTS))
    result.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="mlan-train --seed values")
    result.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5],
                        help="--balance-alpha values (0 = κ measured only)")
    result.add_argument("--aux-weights", type=float, nargs="+", default=[0.0, 1.0],
                        help="--aux-weight values λ (0 = no auxiliary loss; λ = 10 cost image "
                             "accuracy in the 300-step study, docs/commit_balance.md §9)")
    result.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.875],
                        help="--language-share values")
    result.add_argument("--out", default="runs/study", help="directory of the runs (OUT/<run>/run.json)")
    result.add_argument("--jobs", type=int, default=1,
                        help="mlan-train processes at a time (1 = in this process)")
    result.add_argument("--json", default=None, help="results JSON (default: OUT/study.json)")
    result.add_argument("--png", default=None, help="plot (default: next to the JSON, .png)")
    result.add_argument("--kind", choices=KINDS, default=KINDS[0],
                        help="what the JSON and the printed table are: the κ-scheduling study's "
                             "table, or the demo's (per-task mean ± std, then every seed)")
    result.add_argument("--from-json", default=None,
                        help="train nothing: plot and print the table of this finished study")
    return result


def run_name(seed, alpha, aux, share) -> str:
    return f"share{share:g}-alpha{alpha:g}-aux{aux:g}-seed{seed}"


def grid(own):
    """Seed-major: an interrupted study holds whole seeds of every setting."""
    return [(seed, alpha, aux, share) for seed in own.seeds for share in own.shares
            for alpha in own.alphas for aux in own.aux_weights]


def prepare_base(train_args) -> tuple:
    """Make (or reuse) --base once; returns (the pass-through arguments with --base replaced
    by --llama/--clip (+ --max-length, as --base sets it) and --make-data done once, stage 1's
    record: base.json's accuracies and seconds, and the CPU seconds spent here ({} without --base))."""
    from .base import load_base_record, with_pretrained_base
    from .cli import ensure_data, prepare
    from .config import max_length
    import tempfile
    with tempfile.TemporaryDirectory(prefix="study-prepare-") as scratch:
        config = prepare(train_args + ["--out", scratch])
    args = list(train_args)
    if config.make_data:
        ensure_data(config.data, 0, 1)
        args = [a for a in args if a not in ("--make-data",)]
    stage1 = {}
    if config.base:
        index = args.index("--base")
        del args[index:index + 2]
        cpu, reused = time.process_time(), bool(load_base_record(config.base))
        made = with_pretrained_base(config)
        record = load_base_record(config.base)
        stage1 = {"directory": config.base, "reused": reused, "cpu_seconds": time.process_time() - cpu,
                  **{part: record.get(part) for part in ("llama", "clip")}}
        config = made
        args += ["--llama", config.llama, "--clip", config.clip, "--max-length",
                 str(max_length(dataclasses.replace(config, llama=None)))]
    return args, stage1


def run_argv(args, out, seed, alpha, aux, share) -> list:
    return args + ["--out", out, "--seed", str(seed), "--balance-alpha", f"{alpha:g}",
                   "--aux-weight", f"{aux:g}", "--language-share", f"{share:g}"]


def finished(out, argv):
    """{"wall_seconds", "cpu_seconds"} of a run that finished in an earlier invocation with the
    same mlan-train arguments (OUT/<run>/wall.json), or None."""
    path = os.path.join(out, "wall.json")
    if not (os.path.exists(path) and os.path.exists(os.path.join(out, "run.json"))):
        return None
    with open(path, encoding="utf-8") as handle:
        record = json.load(handle)
    return record if record.get("argv") == argv else None


def record_wall(out, argv, wall, cpu):
    """OUT/<run>/wall.json: the run's arguments, wall seconds and CPU seconds (None when not
    measured: --jobs 1 runs in this process)."""
    record = {"argv": argv, "wall_seconds": wall, "cpu_seconds": cpu}
    with open(os.path.join(out, "wall.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    return record


def run_all(own, args) -> list:
    """Train every run of the grid that OUT does not already hold finished with the same
    arguments (an interrupted study continues where it stopped: same options, same --out);
    returns [(key, out, wall.json's record)]."""
    pending, done = [], []
    for key in grid(own):
        out = os.path.join(own.out, run_name(*key))
        record = finished(out, run_argv(args, out, *key))
        if record is None:
            shutil.rmtree(out, ignore_errors=True)          # an interrupted or other run starts over
            pending.append((key, out))
        else:
            done.append((key, out, record))
            print(f"reusing {run_name(*key)} ({record['wall_seconds']:.0f} s)", flush=True)
    if own.jobs <= 1:
        from .cli import prepare, run
        for key, out in pending:
            start = time.perf_counter()
            run(prepare(run_argv(args, out, *key)))
            done.append((key, out, record_wall(out, run_argv(args, out, *key),
                                               time.perf_counter() - start, None)))
        return done
    environment = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    running = []
    while pending or running:
        while pending and len(running) < own.jobs:
            key, out = pending.pop(0)
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "train.log"), "w", encoding="utf-8")
            process = subprocess.Popen([sys.executable, "-m", "mlan_train.cli",
                                        *run_argv(args, out, *key)], stdout=log,
                                       stderr=subprocess.STDOUT, env=environment)
            running.append((process, log, key, out, time.perf_counter()))
            print(f"started {run_name(*key)}", flush=True)
        time.sleep(1.0)
        for entry in list(running):
            process, log, key, out, start = entry
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)   # poll() + the child's CPU time
            if pid == 0:
                continue
            process.returncode = os.waitstatus_to_exitcode(status)
            running.remove(entry)
            log.close()
            if process.returncode != 0:
                raise RuntimeError(f"{run_name(*key)} failed ({process.returncode}); see {out}/train.log")
            done.append((key, out, record_wall(out, run_argv(args, out, *key), time.perf_counter() - start,
                                               usage.ru_utime + usage.ru_stime)))
            print(f"finished {run_name(*key)} in {done[-1][2]['wall_seconds']:.0f} s "
                  f"({done[-1][2]['cpu_seconds']:.0f} CPU s)", flush=True)
    return done


def loss_digest(losses) -> str:
    """SHA-256 of the loss trace as float64 bytes: equal exactly when every logged loss is."""
    return hashlib.sha256(struct.pack(f"<{len(losses)}d", *losses)).hexdigest()


def run_record(key, out, timing) -> dict:
    """One run's numbers from its run.json (timing: its wall.json record)."""
    seed, alpha, aux, share = key
    with open(os.path.join(out, "run.json"), encoding="utf-8") as handle:
        run = json.load(handle)
    final, probes = run["final_eval"], run["kappa"]
    train_seconds = run["throughput"]["train_seconds"]
    probe_seconds = sum(r["probe_seconds"] for r in probes)
    by_task = {task: value for modality in ("text", "image")
               for task, value in final[modality].get("by_task", {}).items()}
    kept = [r for r in probes if not r.get("skipped")]
    return {"seed": seed, "alpha": alpha, "aux_weight": aux, "share": share,
            "text_accuracy": final["text"]["accuracy"], "image_accuracy": final["image"]["accuracy"],
            "by_task": by_task, "image_tokens": run["tokens"]["image_tokens"],
            "text_tokens": run["tokens"]["text_tokens"], "wall_seconds": timing["wall_seconds"],
            "cpu_seconds": timing.get("cpu_seconds"), "steps": run["config"]["steps"],
            "image_samples": run["tokens"]["samples_image"], "loss_digest": loss_digest(run["loss"]),
            "train_seconds": train_seconds, "probe_seconds": probe_seconds,
            "probe_overhead": probe_seconds / train_seconds if train_seconds else None,
            "probes": len(probes), "skipped_probes": len(probes) - len(kept),
            "final_kappa_hat": probes[-1]["kappa_ema"] if probes else None,
            "aux_steps": sum(1 for r in probes if r.get("aux_side")),
            "final_loss": statistics.fmean(run["loss"][-20:])}


METRICS = ("image_accuracy", "text_accuracy", "image_tokens", "text_tokens", "wall_seconds",
           "cpu_seconds", "train_seconds", "probe_overhead", "final_kappa_hat", "aux_steps", "final_loss")


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarize(runs) -> list:
    """One group per (share, α, λ): mean and sample std over seeds of every metric."""
    groups = {}
    for run in sorted(runs, key=lambda r: (r["share"], r["alpha"], r["aux_weight"], r["seed"])):
        groups.setdefault((run["share"], run["alpha"], run["aux_weight"]), []).append(run)
    result = []
    for (share, alpha, aux), members in groups.items():
        tasks = sorted({task for run in members for task in run["by_task"]},
                       key=lambda t: TASKS.index(t) if t in TASKS else len(TASKS))
        result.append({"share": share, "alpha": alpha, "aux_weight": aux,
                       "seeds": [run["seed"] for run in members],
                       **{metric: mean_std([run[metric] for run in members]) for metric in METRICS},
                       "by_task": {task: mean_std([run["by_task"].get(task) for run in members])
                                   for task in tasks}})
    return result


def cpu_id() -> dict:
    """Vendor, family and model of the CPU (/proc/cpuinfo; {} elsewhere): the numerics of
    MKL/oneDNN kernels, and so the demo's results, differ between CPU types."""
    fields = {"vendor_id": "vendor", "cpu family": "family", "model": "model"}
    found = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in fields and fields[key.strip()] not in found:
                    found[fields[key.strip()]] = value.strip()
                if not line.strip():
                    break
    except OSError:
        pass
    return found


def environment() -> dict:
    """CPU, versions, date, OMP threads and the 1/5/15-min load average when the study started
    (other work on the machine)."""
    from mlan_kernels.testing import cpu_model
    return {"device": cpu_model(), "cpu_id": cpu_id(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
            "threads": os.environ.get("OMP_NUM_THREADS")}


def plot(data, path):
    """Per (α, λ): held-out accuracy of each image task and of the text tasks (mean ± std over
    seeds), one panel per language share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shares = sorted({g["share"] for g in data["groups"]})
    figure, axes = plt.subplots(1, len(shares), figsize=(5.5 * len(shares), 3.8), squeeze=False)
    for axis, share in zip(axes[0], shares):
        groups = [g for g in data["groups"] if g["share"] == share]
        bars = [(task, lambda g, t=task: g["by_task"].get(t)) for task in ("colour", "shape", "side")]
        bars.append(("text", lambda g: g["text_accuracy"]))
        width = 0.8 / len(bars)
        for index, (name, value) in enumerate(bars):
            pairs = [value(g) or [0.0, 0.0] for g in groups]
            axis.bar([i + (index - (len(bars) - 1) / 2) * width for i in range(len(groups))],
                     [100 * m for m, _ in pairs], width, yerr=[100 * s for _, s in pairs],
                     capsize=2, label=name)
        axis.set_xticks(range(len(groups)),
                        [f"α={g['alpha']:g}, λ={g['aux_weight']:g}" for g in groups])
        axis.set_ylim(0, 100)
        axis.set_title(f"language share {share:g} ({len(groups[0]['seeds'])} seeds, mean ± std)")
        axis.set_ylabel("held-out accuracy %")
    axes[0][0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(bars), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> int:
    from mlan_kernels.training.study_table import render_study_json
    own, train_args = parser().parse_known_args(argv)
    if own.from_json:                   # re-plot and re-print a finished study
        with open(own.from_json, encoding="utf-8") as handle:
            data = json.load(handle)
        plot(data, own.png or os.path.splitext(own.from_json)[0] + ".png")
        print(render_study_json(data, own.from_json))
        return 0
    command = "python python/study_balance.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start, started = time.perf_counter(), environment()
    args, stage1 = prepare_base(STUDY_DEFAULTS + train_args)
    stage1 = stage1 and {**stage1, "wall_seconds": time.perf_counter() - start}
    done = run_all(own, args)
    # in (share, α, λ, seed) order, whichever parallel run finished first
    done = sorted(done, key=lambda item: (item[0][3], item[0][1], item[0][2], item[0][0]))
    runs = [run_record(key, out, timing) for key, out, timing in done]
    data = {"kind": own.kind, "command": command, "environment": started,
            "settings": {"seeds": own.seeds, "alphas": own.alphas, "aux_weights": own.aux_weights,
                         "shares": own.shares, "jobs": own.jobs, "mlan_train": STUDY_DEFAULTS + train_args},
            "stage1": stage1, "total_seconds": time.perf_counter() - start, "runs": runs,
            "groups": summarize(runs)}
    path = own.json or os.path.join(own.out, "study.json")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")
    plot(data, own.png or os.path.splitext(path)[0] + ".png")
    print(render_study_json(data, path))
    return 0
