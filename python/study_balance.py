"""The κ-scheduling study (issue 18; ours): seeds × α × λ × shares of mlan-train on the frozen
stage-1 base, mean ± std over seeds, a JSON, a PNG and the table the README renders.

    OMP_NUM_THREADS=1 python python/study_balance.py --data data/synthetic --base runs/base \\
        --jobs 2 --json benchmarks/results/balance-study.json

Options: python python/study_balance.py --help (mlan_train/study.py); every option it does not
know goes to each mlan-train run.
"""
import sys

from mlan_train.study import main

if __name__ == "__main__":
    sys.exit(main())
