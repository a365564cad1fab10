"""Results on disk and on screen: environment metadata, the text table, JSON and CSV.

JSON: {"environment": {...}, "command": "...", "rows": [row, ...]} (rows: see runner.py; the
e2e_step rows carry their own keys too). CSV: one line per row, the union of the rows' keys.
Default file name: <device-slug>-<dtype>-<date>.json, e.g. h100-bf16-2026-11-23.json,
cpu-2core-fp32-2026-11-23.json.
"""
import csv
import datetime
import json
import os
import platform
import re

import torch

from mlan_kernels.testing import cpu_model

DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def environment(device, dtype) -> dict:
    """Device name, versions, threads, date, dtype and the 1/5/15-min load average (other work
    on the machine when the run started) of this run."""
    device = torch.device(device)
    info = {"date": datetime.date.today().isoformat(), "dtype": str(dtype).replace("torch.", ""),
            "device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "cuda": torch.version.cuda, "triton": None,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else info["cpu"]
    return info


def device_slug(env: dict) -> str:
    """"h100" for "NVIDIA H100 80GB HBM3", "cpu-2core" for a CPU run on 2 threads."""
    if env["device_type"] != "cuda":
        return f"cpu-{env['threads']}core"
    words = env["device"].replace("NVIDIA", "").split()
    return re.sub(r"[^a-z0-9]+", "-", (words[0] if words else "gpu").lower()).strip("-")


def default_path(out_dir, env: dict) -> str:
    dtype = DTYPE_SHORT.get(env["dtype"], env["dtype"])
    return os.path.join(out_dir, f"{device_slug(env)}-{dtype}-{env['date']}.json")


def write_json(path, env, rows, command=None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"environment": env, "command": command, "rows": rows}, handle, indent=1)


def load_json(path) -> dict:
    with open(path) as handle:
        return json.load(handle)


def write_csv(path, rows):
    keys = list(dict.fromkeys(key for row in rows for key in row))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


# Measured columns shared by the text table and the Markdown renderer: (title, key, decimals, scale)
COLUMNS = (("median ms", "median_ms", 3, 1.0), ("IQR ms", "iqr_ms", 3, 1.0), ("GB/s", "gb_per_s", 1, 1.0),
           ("% copy", "pct_copy", 1, 1.0), ("x eager", "speedup_vs_eager", 2, 1.0),
           ("peak MiB", "peak_memory_bytes", 1, 2.0**20), ("saved MiB", "saved_bytes", 2, 2.0**20))
KEYS = ("op", "phase", "shape", "impl")     # the row's identity, printed whole

# A timing is flagged untrustworthy when its spread is wide or its sample small.
NOISY_IQR_RATIO = 0.25   # IQR / median above this: calls varied too much to compare medians
TRUSTED_ITERS = 10       # fewer timed calls than this: quartiles from too few samples


def cells(row, missing="-") -> list:
    """The row's COLUMNS as strings (`missing` where not measured)."""
    return [missing if row.get(key) is None else f"{row[key] / scale:.{decimals}f}"
            for _, key, decimals, scale in COLUMNS]


def check_text(row) -> str:
    return {True: "ok", False: "FAIL", None: ""}[row.get("ok")]


def trust_warning(row) -> str:
    """Why the row's timing should not be trusted, "" when nothing is wrong: fewer than
    TRUSTED_ITERS timed calls, or an IQR above NOISY_IQR_RATIO of the median."""
    reasons = []
    iters, median, iqr = row.get("iters"), row.get("median_ms"), row.get("iqr_ms")
    if iters is not None and iters < TRUSTED_ITERS:
        reasons.append(f"{iters} iters < {TRUSTED_ITERS}")
    if median and iqr is not None and iqr / median > NOISY_IQR_RATIO:
        reasons.append(f"IQR {iqr / median:.0%} of median > {NOISY_IQR_RATIO:.0%}")
    return ", ".join(reasons)


def case_warnings(rows) -> list:
    """One line per case (op and shape) with untrustworthy timings: which rows and why."""
    flagged = {}
    for row in rows:
        reason = "error" not in row and trust_warning(row)
        if reason:
            flagged.setdefault((row["op"], row["shape"]), []).append(f"{row['impl']} {row['phase']} ({reason})")
    return [f"WARNING {op} {shape}: timings not to be trusted: {'; '.join(items)}"
            for (op, shape), items in flagged.items()]


def format_table(rows) -> str:
    """Fixed-width text table of the rows (one line each; errors shown as such), identity
    columns as wide as their longest entry, a warning column where a timing is not to be trusted."""
    widths = [max([len(key)] + [len(str(row[key])) for row in rows]) + 2 for key in KEYS]
    header = "".join(f"{key:<{width}}" for key, width in zip(KEYS, widths)) + \
        "".join(f"{title:>11}" for title, *_ in COLUMNS) + "  check  warning"
    lines = [header, "-" * len(header)]
    for row in rows:
        start = "".join(f"{str(row[key]):<{width}}" for key, width in zip(KEYS, widths))
        if "error" in row:
            lines.append(start + f"  error: {row['error'][:80]}")
            continue
        warning = trust_warning(row)
        lines.append((start + "".join(f"{cell:>11}" for cell in cells(row)) + f"  {check_text(row):<5}"
                      + (f"  WARNING {warning}" if warning else "")).rstrip())
    return "\n".join(lines)


E2E_ROLES = {"fused": "ours", "eager_adapters": "reference", "no_adapters": "baseline"}


def e2e_rows(results) -> list:
    """Rows of mlan_bench.e2e_step.run_e2e_step in this module's schema (their own
    keys kept): op e2e_step, phase "step", impl = variant, times in ms."""
    rows = []
    for result in results:
        row = dict(result)
        row.update(op="e2e_step", phase="step", impl=result["variant"],
                   role=E2E_ROLES.get(result["variant"], "baseline"),
                   shape=f"layers={result['layers']} D={result['dim']} tokens={result['tokens']}",
                   size=result["tokens"], series=f"layers={result['layers']} D={result['dim']}",
                   median_ms=result["median_s"] * 1e3, iqr_ms=result["iqr_s"] * 1e3)
        rows.append(row)
    return rows
