"""Render benchmark JSON (benchmarks/results/*.json) as Markdown, for the README.

    python -m mlan_kernels.bench.render benchmarks/results/cpu-2core-fp32-2026-11-23.json \
        [--op mm_adapter] [--phase fwd+bwd]
    (also: python -m benchmarks.render_results ...)
The README's tables are pasted from this output, never typed by hand. Reads this package's
format (report.py) and the older one of benchmarks/bench_mm_adapter.py (MM-Adapter rows
without `op`, e.g. benchmarks/results/h100-bf16-2026-11-23.json).
"""
import argparse

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


def render(path, ops=None, phases=None) -> str:
    """Header line + Markdown table of the JSON at `path`, filtered by op and phase."""
    data = load_json(path)
    titles = [title for title, _ in KEYS] + [title for title, *_ in COLUMNS] + ["check"]
    lines = [header(data["environment"], path), "", "| " + " | ".join(titles) + " |",
             "|" + "---|" * len(titles)]
    for row in map(normalize, data["rows"]):
        if (ops and row["op"] not in ops) or (phases and row["phase"] not in phases):
            continue
        measured = ([f"error: {row['error']}"] + [""] * len(COLUMNS) if "error" in row
                    else cells(row, missing="") + [check_text(row)])
        lines.append("| " + " | ".join([str(row[key]) for key, _ in KEYS] + measured) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="results JSON files")
    parser.add_argument("--op", nargs="+", help="only these ops (e.g. mm_adapter kl_div)")
    parser.add_argument("--phase", nargs="+", help="only these phases (fwd bwd fwd+bwd step copy)")
    args = parser.parse_args(argv)
    print("\n\n".join(render(path, args.op, args.phase) for path in args.paths))


if __name__ == "__main__":
    main()
