"""Kernel benchmarks: our backends and the baselines on the same tensors, in the same run.

    mlan-bench --device cpu            (or: python -m benchmarks.run / python -m mlan_bench.cli)

Layout: timing.py (median/IQR, peak memory, saved-activation bytes) · traffic.py (minimum bytes
each op must move) · cases*.py (ops x shapes x implementations) · runner.py (a case -> rows) ·
report.py (table, JSON, CSV) · plots.py (PNG) · render.py (Markdown for the README) · cli.py.
Imports only point down into mlan_kernels; nothing here is imported by the package itself.
"""
