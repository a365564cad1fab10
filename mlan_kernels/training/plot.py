"""Plots of training logs.

    python -m mlan_kernels.training.plot balance run.jsonl [-o run.png]

`balance`: BalanceMonitor's JSONL rows (step, kl_feat, kl_lang, kappa, kappa_ema, and when
logged m_feat, m_lang, grad_norm_feat, grad_norm_lang, loss) -> one PNG with three panels:
κ and κ̂ (log scale), the LR multipliers, the per-group gradient norms (and KLs).
"""
import argparse
import json
import sys
from pathlib import Path

from ..help_format import DefaultsHelpFormatter


def read_jsonl(path) -> list:
    """Rows of a JSONL file (blank lines skipped); ValueError naming the line on bad JSON."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not JSON ({error})") from None
    return rows


def _nan(value):
    return float("nan") if value is None else value       # e.g. κ̂ before the first unskipped probe


def _series(axis, rows, keys, log=False):
    steps = [row["step"] for row in rows]
    drawn = False
    for key in keys:
        if any(key in row for row in rows):
            axis.plot(steps, [_nan(row.get(key)) for row in rows], marker=".", label=key)
            drawn = True
    if drawn:
        axis.legend(loc="best", fontsize="small")
        if log:
            axis.set_yscale("log")
    else:
        axis.text(0.5, 0.5, "not logged: " + ", ".join(keys), ha="center", va="center",
                  transform=axis.transAxes)


def plot_balance(rows: list, output) -> Path:
    """Write the three-panel balance figure of `rows` to `output` (PNG); returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not rows:
        raise ValueError("no rows to plot")
    figure, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    _series(axes[0], rows, ["kappa", "kappa_ema"], log=True)
    axes[0].axhline(1.0, color="grey", linewidth=0.8)
    axes[0].set_ylabel("κ (feature / language)")
    _series(axes[1], rows, ["m_feat", "m_lang"])
    axes[1].set_ylabel("LR multiplier")
    _series(axes[2], rows, ["grad_norm_feat", "grad_norm_lang", "kl_feat", "kl_lang"], log=True)
    axes[2].set_ylabel("grad norm / KL")
    axes[2].set_xlabel("step")
    figure.suptitle("CoMMIT balance (our interpretation)")
    figure.tight_layout()
    output = Path(output)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlan_kernels.training.plot",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    balance = commands.add_parser("balance", help="κ, multipliers, grad norms from a BalanceMonitor JSONL",
                                  formatter_class=DefaultsHelpFormatter)
    balance.add_argument("log", help="JSONL file written by BalanceMonitor(log_path=...)")
    balance.add_argument("-o", "--output", help="PNG path (default: the log's name with .png)")
    args = parser.parse_args(argv)
    output = args.output or str(Path(args.log).with_suffix(".png"))
    path = plot_balance(read_jsonl(args.log), output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
