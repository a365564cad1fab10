"""Render benchmark JSON (benchmarks/results/*.json) as Markdown, for the README.

    python -m mlan_bench.render benchmarks/results/cpu-2core-fp32-2026-11-23.json \
        [--op mm_adapter] [--phase fwd+bwd]
    (also: python -m benchmarks.render_results ...)
    python -m mlan_bench.render --update-readme README.md
The README's tables come from this output, never typed by hand: --update-readme re-renders every
block between `<!-- results: FILE [--op ...] [--phase ...] -->` and `<!-- /results -->` (a test
checks the README is in sync with the JSON). Reads this package's
format (report.py) and the older one of benchmarks/bench_mm_adapter.py (MM-Adapter rows
without `op`, e.g. benchmarks/results/h100-bf16-2026-11-23.json).
"""
import argparse
import re
import shlex

from mlan_kernels.help_format import DefaultsHelpFormatter
from .report import COLUMNS, KEYS, cells, check_text, load_json


def normalize(row: dict) -> dict:
    """A row of either format in this package's schema (old rows: impl/phase/tokens/dim)."""
    if "op" in row:
        return row
    routing = "single" if row.get("single_modality") else "mixed"
    return dict(row, op="mm_adapter", role="reference" if row["impl"] == "eager" else "",
                shape=f"N={row['tokens']} D={row['dim']} g={row.get('groups', 2)} {routing}",
                iqr_ms=row["q3_ms"] - row["q1_ms"])


def header(env: dict, path) -> str:
    return (f"{env['device']}; torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}; "
            f"{env['date']}; dtype {env.get('dtype', 'see rows')}; {env.get('threads')} threads (`{path}`)")


def _pm(value, scale=1.0, spec=".1f") -> str:
    """"mean ± std" of a [mean, std] pair (scaled), "" for None."""
    if value is None:
        return ""
    return f"{format(value[0] * scale, spec)} ± {format(value[1] * scale, spec)}"


def study_header(data: dict, label) -> str:
    """One line: where and how a κ-scheduling study ran."""
    env, settings = data["environment"], data["settings"]
    return (f"{env['device']} ({env['cpus']} cores); torch {env['torch']}; {env['date']}; "
            f"{len(settings['seeds'])} seeds, {settings['jobs']} runs at a time, "
            f"{data['total_seconds'] / 60:.0f} min in all (`{label}`)")


def render_study(data: dict, label=None) -> str:
    """Markdown table of a κ-scheduling study (mlan_train/study.py): per (share, α, λ), mean ±
    std over seeds (no header line: the README names the file and the setting in its text;
    study_header gives one)."""
    tasks = list(dict.fromkeys(task for group in data["groups"] for task in group["by_task"]))
    lines = ["| share | α | λ | image % | " + " | ".join(f"{t} %" for t in tasks)
             + " | text % | image tokens | text tokens | wall s | probe overhead % | final κ̂ |",
             "|" + "---|" * (10 + len(tasks))]
    for g in data["groups"]:
        kappa = "" if g["final_kappa_hat"] is None else f"{g['final_kappa_hat'][0]:.3g}"
        lines.append(
            f"| {g['share']:g} | {g['alpha']:g} | {g['aux_weight']:g} | "
            f"{_pm(g['image_accuracy'], 100)} | "
            + " | ".join(_pm(g["by_task"].get(t), 100, ".0f") for t in tasks)
            + f" | {_pm(g['text_accuracy'], 100)} | {_pm(g['image_tokens'], 1, '.0f')} | "
            f"{_pm(g['text_tokens'], 1, '.0f')} | {_pm(g['wall_seconds'], 1, '.0f')} | {_pm(g['probe_overhead'], 100, '.0f')} | {kappa} |")
    return "\n".join(lines)


TASK_ORDER = ("colour", "shape", "side", "add", "bigger", "repeat")


def _tasks(entries) -> list:
    names = {task for entry in entries for task in entry["by_task"]}
    return sorted(names, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))


def demo_header(data: dict, label) -> str:
    """One line: where and how the demo ran (CPU, torch, seeds, steps, threads) and the CPU
    seconds of a stage-2 run per share (a machine's load changes wall time, not these)."""
    env, settings = data["environment"], data["settings"]
    steps = "/".join(f"{s:,}" for s in sorted({run["steps"] for run in data["runs"]}))
    cpu = ", ".join(f"{g['share']:g}: {g['cpu_seconds'][0]:.0f} s" for g in data["groups"]
                    if g.get("cpu_seconds"))
    return (f"{env['device']} ({env['cpus']} cores); torch {env['torch']}; {env['date']}; stage 2: "
            f"{steps} steps, seeds {', '.join(map(str, settings['seeds']))}, "
            f"{env.get('threads') or 'default'} thread(s) per run"
            + (f"; CPU time per run at share {cpu}" if cpu else "") + f" (`{label}`)")


def render_demo(data: dict, label=None) -> str:
    """The demo's tables (mlan_train/study.py --kind demo): per language share, held-out
    accuracy mean ± std over seeds (image, each task, text), then every seed's numbers; with a
    label, demo_header's line first."""
    tasks = _tasks(data["groups"])
    lines = [demo_header(data, label), ""] if label else []
    lines += ["| share | seeds | image % | " + " | ".join(f"{t} %" for t in tasks)
             + " | text % | image samples |", "|" + "---|" * (5 + len(tasks))]
    for g in data["groups"]:
        samples = [r["image_samples"] for r in data["runs"] if r["share"] == g["share"]]
        lines.append(f"| {g['share']:g} | {len(g['seeds'])} | {_pm(g['image_accuracy'], 100)} | "
                     + " | ".join(_pm(g["by_task"].get(t), 100, ".0f") for t in tasks)
                     + f" | {_pm(g['text_accuracy'], 100)} | {min(samples):,}"
                     + (f"–{max(samples):,}" if max(samples) > min(samples) else "") + " |")
    lines += ["", "| share | seed | image % | " + " | ".join(f"{t} %" for t in tasks)
              + " | text % | loss, last 20 steps | loss trace SHA-256 |", "|" + "---|" * (6 + len(tasks))]
    for r in sorted(data["runs"], key=lambda r: (r["share"], r["seed"])):
        lines.append(f"| {r['share']:g} | {r['seed']} | {100 * r['image_accuracy']:.1f} | "
                     + " | ".join("" if r["by_task"].get(t) is None else f"{100 * r['by_task'][t]:.0f}"
                                  for t in tasks)
                     + f" | {100 * r['text_accuracy']:.1f} | {r['final_loss']:.4f} | "
                     f"`{r.get('loss_digest', '')[:12]}` |")
    return "\n".join(lines)


def render_study_json(data: dict, label) -> str:
    """What mlan_train/study.py prints: the demo's tables, or the κ study's with its header."""
    if data.get("kind") == "demo":
        return render_demo(data, label)
    return study_header(data, label) + "\n\n" + render_study(data)


def render(path, ops=None, phases=None, label=None) -> str:
    """Header line + Markdown table of the JSON at `path`, filtered by op and phase; the header
    names the file as `label` (default: path). A κ-scheduling study's JSON (kind
    "balance-study") renders as its own table (render_study)."""
    data = load_json(path)
    if data.get("kind") == "balance-study":
        return render_study(data, label or path)
    if data.get("kind") == "demo":
        return render_demo(data, label or path)
    titles = list(KEYS) + [title for title, *_ in COLUMNS] + ["check"]
    lines = [header(data["environment"], label or path), "", "| " + " | ".join(titles) + " |",
             "|" + "---|" * len(titles)]
    for row in map(normalize, data["rows"]):
        if (ops and row["op"] not in ops) or (phases and row["phase"] not in phases):
            continue
        measured = ([f"error: {row['error']}"] + [""] * len(COLUMNS) if "error" in row
                    else cells(row, missing="") + [check_text(row)])
        lines.append("| " + " | ".join([str(row[key]) for key in KEYS] + measured) + " |")
    return "\n".join(lines)


BLOCK = re.compile(r"(<!-- results: (?P<args>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def _parser():
    parser = argparse.ArgumentParser(prog="python -m mlan_bench.render",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("paths", nargs="*", help="results JSON files to print as tables (default: none)")
    parser.add_argument("--op", nargs="+", help="only these ops, e.g. mm_adapter kl_div (default: all)")
    parser.add_argument("--phase", nargs="+",
                        help="only these phases: fwd bwd fwd+bwd step copy (default: all)")
    parser.add_argument("--update-readme", metavar="README",
                        help="re-render the results blocks of this file in place (default: none)")
    return parser


def render_blocks(text: str, root=".") -> str:
    """`text` with every results block re-rendered from the JSON its marker names (paths
    relative to `root`)."""
    import os

    def replace(match):
        args = _parser().parse_args(shlex.split(match["args"]))
        body = "\n\n".join(render(os.path.join(root, path), args.op, args.phase, label=path)
                             for path in args.paths)
        return match.group(1) + body + "\n" + match.group(4)
    return BLOCK.sub(replace, text)


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.update_readme:
        import os
        with open(args.update_readme, encoding="utf-8") as handle:
            text = handle.read()
        updated = render_blocks(text, os.path.dirname(os.path.abspath(args.update_readme)))
        with open(args.update_readme, "w", encoding="utf-8") as handle:
            handle.write(updated)
        print(f"{args.update_readme}: {len(BLOCK.findall(text))} results block(s) rendered")
        return
    if not args.paths:
        _parser().error("give results JSON files or --update-readme README")
    print("\n\n".join(render(path, args.op, args.phase) for path in args.paths))


if __name__ == "__main__":
    main()
