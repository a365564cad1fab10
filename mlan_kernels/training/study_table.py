"""The tables of mlan_train/study.py's JSON (a κ-scheduling study, or the demo's seeds): a header
line and Markdown tables, printed by the study and rendered into the README by
`python -m mlan_bench.render --update-readme README.md`.
"""


def mean_std_text(value, scale=1.0, spec=".1f") -> str:
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
            f"{mean_std_text(g['image_accuracy'], 100)} | "
            + " | ".join(mean_std_text(g["by_task"].get(t), 100, ".0f") for t in tasks)
            + f" | {mean_std_text(g['text_accuracy'], 100)} | {mean_std_text(g['image_tokens'], 1, '.0f')} | "
            f"{mean_std_text(g['text_tokens'], 1, '.0f')} | {mean_std_text(g['wall_seconds'], 1, '.0f')} | "
            f"{mean_std_text(g['probe_overhead'], 100, '.0f')} | {kappa} |")
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
        lines.append(f"| {g['share']:g} | {len(g['seeds'])} | {mean_std_text(g['image_accuracy'], 100)} | "
                     + " | ".join(mean_std_text(g["by_task"].get(t), 100, ".0f") for t in tasks)
                     + f" | {mean_std_text(g['text_accuracy'], 100)} | {min(samples):,}"
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
