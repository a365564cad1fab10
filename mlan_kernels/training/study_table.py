"""The κ-scheduling study's result table (mlan_train/study.py writes the study JSON): a header
line and a Markdown table, printed by the study and rendered into the README by
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
