"""Run the kernel benchmarks: a thin wrapper of mlan_bench.cli (the `mlan-bench` command).

    python -m benchmarks.run --device cpu          python benchmarks/run.py --help
"""
import sys

from mlan_bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
