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


def render(path, ops=None, phases=None, label=None) -> str:
    """Header line + Markdown table of the JSON at `path`, filtered by op and phase; the header
    names the file as `label` (default: path). A κ-scheduling study's JSON (kind
    "balance-study") renders as its own table (render_study)."""
    data = load_json(path)
    if data.get("kind") in ("balance-study", "demo"):
        from mlan_kernels.training.study_table import render_demo, render_study
        return (render_demo if data["kind"] == "demo" else render_study)(data, label or path)
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
