"""Render recorded benchmark JSON as Markdown: a wrapper of mlan_bench.render.

    python -m benchmarks.render_results benchmarks/results/cpu-2core-fp32-2026-11-23.json [--op mm_adapter] [--phase fwd+bwd]
The README's performance tables are pasted from this output, never typed by hand.
"""
from mlan_bench.render import main

if __name__ == "__main__":
    main()
