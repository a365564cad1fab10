"""Render recorded benchmark JSON (benchmarks/results/*.json) as a Markdown table.

    python -m benchmarks.render_results benchmarks/results/h100-bf16-2026-11-23.json [--phase fwd+bwd]
The README's performance tables are pasted from this output, never typed by hand.
"""
import argparse
import json


def render(path, phases):
    with open(path) as handle:
        data = json.load(handle)
    env = data["environment"]
    lines = [f"{env['device']}, torch {env['torch']}, triton {env.get('triton')}, "
             f"CUDA {env.get('cuda')}, {env['date']} (`{path}`)", "",
             "| impl | phase | N | D | dtype | median ms (IQR) | GB/s | % copy BW | × eager |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        if row["phase"] not in phases:
            continue
        speedup = row.get("speedup_vs_eager")
        lines.append(
            f"| {row['impl']}{' (single-modality)' if row.get('single_modality') else ''} | {row['phase']} "
            f"| {row['tokens']} | {row['dim']} | {row['dtype']} | {row['median_ms']:.3f} "
            f"({row['q1_ms']:.3f}–{row['q3_ms']:.3f}) | {row['gb_per_s']:.0f} | {row['pct_copy']:.1f} "
            f"| {'' if speedup is None else f'{speedup:.2f}'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--phase", nargs="+", default=["fwd", "bwd", "fwd+bwd"])
    args = parser.parse_args(argv)
    print("\n\n".join(render(path, args.phase) for path in args.paths))


if __name__ == "__main__":
    main()
