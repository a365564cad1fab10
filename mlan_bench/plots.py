"""PNG plots of result rows (matplotlib, Agg backend: no display needed).

Per op, <stem>-<op>.png: one column per phase; top row median time vs size (tokens, log-log),
bottom row % of copy bandwidth vs size; one colour per implementation, one line style per
series (D, or V, ... : case.series). <stem>-speedup.png: per op and phase, bars of the
speed-up over the eager reference at the largest measured problem of that op.
"""
import os

ROW_TIME, ROW_PCT = 0, 1
LINE_STYLES = ("-", "--", ":", "-.")
SPEEDUP_COLUMNS = 4


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _timed(rows):
    return [row for row in rows if "median_ms" in row]


def plot_op(rows, op, path):
    """Time and % of copy bandwidth vs size for one op -> PNG at `path`."""
    plt = _pyplot()
    rows = [row for row in _timed(rows) if row["op"] == op and row["role"] != "ceiling"]
    phases = list(dict.fromkeys(row["phase"] for row in rows))
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    series = list(dict.fromkeys(row["series"] for row in rows))
    figure, axes = plt.subplots(2, len(phases), figsize=(5 * len(phases), 7), squeeze=False)
    colours = {impl: f"C{index}" for index, impl in enumerate(impls)}
    for column, phase in enumerate(phases):
        for impl in impls:
            for index, name in enumerate(series):
                points = sorted((row["size"], row["median_ms"], row.get("pct_copy")) for row in rows
                                if row["phase"] == phase and row["impl"] == impl and row["series"] == name)
                if not points:
                    continue
                style = dict(color=colours[impl], linestyle=LINE_STYLES[index % len(LINE_STYLES)], marker="o",
                             label=f"{impl} {name}")
                sizes = [point[0] for point in points]
                axes[ROW_TIME][column].plot(sizes, [point[1] for point in points], **style)
                axes[ROW_PCT][column].plot(sizes, [point[2] or 0.0 for point in points], **style)
        axes[ROW_TIME][column].set(title=f"{op} {phase}", xscale="log", yscale="log", ylabel="median ms")
        axes[ROW_PCT][column].set(xscale="log", xlabel="size (tokens / values)", ylabel="% of copy bandwidth")
    axes[ROW_TIME][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_speedups(rows, path):
    """Speed-up over the eager reference per op/phase at its largest problem -> PNG at `path`."""
    plt = _pyplot()
    rows = [row for row in _timed(rows) if row.get("speedup_vs_eager") and row["role"] != "reference"]
    groups = list(dict.fromkeys((row["op"], row["phase"]) for row in rows))
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    columns = min(max(len(groups), 1), SPEEDUP_COLUMNS)
    lines = max(-(-len(groups) // columns), 1)
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.6 * lines), squeeze=False)
    for axis in axes.flat[len(groups):]:
        axis.set_visible(False)
    for axis, (op, phase) in zip(axes.flat, groups):
        mine = [row for row in rows if (row["op"], row["phase"]) == (op, phase)]
        largest = max(mine, key=lambda row: (row.get("min_bytes") or 0, row["size"]))["shape"]
        mine = [row for row in mine if row["shape"] == largest]
        axis.bar([row["impl"] for row in mine], [row["speedup_vs_eager"] for row in mine],
                 color=[f"C{impls.index(row['impl'])}" for row in mine])
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_title(f"{op} {phase}\n{largest}", fontsize=8)
        axis.set_ylabel("x eager reference")
        axis.tick_params(axis="x", labelrotation=45, labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_all(rows, directory, stem) -> list:
    """Every plot of `rows` into `directory` as <stem>-<op>.png and <stem>-speedup.png."""
    os.makedirs(directory, exist_ok=True)
    paths = [plot_op(rows, op, os.path.join(directory, f"{stem}-{op}.png"))
             for op in dict.fromkeys(row["op"] for row in _timed(rows))]
    paths.append(plot_speedups(rows, os.path.join(directory, f"{stem}-speedup.png")))
    return paths
