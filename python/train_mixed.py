"""Mixed-modality instruction tuning of a LaVIN-patched LLaMA + CLIP on an MLAN mixture.

The same program as the `mlan-train` entry point (mlan_train/cli.py); see
`python python/train_mixed.py --help` and the README's "Train on an MLAN mixture" section.

    python python/train_mixed.py --data data/synthetic --make-data --shares 0.5 0.875
    torchrun --nproc_per_node=2 python/train_mixed.py --data data/synthetic --steps 50
"""
import sys

from mlan_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
