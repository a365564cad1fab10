"""`mlan-train`: the mixed-modality training program (a LaVIN-patched LLaMA + CLIP on an MLAN
mixture, CoMMIT κ probes, exact resume, DDP), built on the mlan_kernels library, which never
imports it. Entry point: mlan_train.cli:main (also `python python/train_mixed.py`).

Layout: config.py (TrainConfig, flags) · preflight.py (checks before step 0) · base.py (stage 1:
the pretrained tiny base) · model.py (build, CoMMIT sides) · trainer.py (steps, probes) ·
batches.py / evaluate.py / throughput.py · state.py / swap.py (checkpoints) · report.py · cli.py.
"""
from mlan_kernels.requirements import require_extra

require_extra("train", __name__)
