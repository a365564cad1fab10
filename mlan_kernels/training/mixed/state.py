"""Checkpoints of the training program, for exact resumption.

A checkpoint directory holds
    adapters/                 save_adapters(): adapters + neck + modality token (what users ship)
    trainable.safetensors     every trainable parameter by name (the base too with --train-base)
    trainer_state.pt          step, optimizer, scheduler, batch-sampler position, κ̂ monitor,
                              history (losses, κ trace, token counts), config
    rng_rank{r}.pt            torch's RNG state of rank r (adapter dropout seeds come from it)
Loading restores all of it, so a resumed run continues with bit-identical losses (CPU,
deterministic kernels). torch.load uses weights_only=True: nothing in it executes code.
"""
import os

import torch

from ...checkpoint import save_adapters

STATE_NAME, TRAINABLE_NAME = "trainer_state.pt", "trainable.safetensors"


def _scheduler_state(scheduler) -> dict:
    state = scheduler.state_dict()
    state.pop("base_schedule", None)          # rebuilt from the config (not a plain type)
    return state


def save_checkpoint(directory, trainer, rank: int = 0):
    """Write the checkpoint of `trainer` (a MixedTrainer) to `directory`; every rank writes its
    RNG state, rank 0 the rest."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(directory, f"rng_rank{rank}.pt"))
    if rank != 0:
        return
    module = trainer.module
    save_adapters(module, os.path.join(directory, "adapters"))
    trainable = {name: p.detach().to("cpu").contiguous()
                 for name, p in module.named_parameters() if p.requires_grad}
    save_file(trainable, os.path.join(directory, TRAINABLE_NAME), metadata={"format": "pt"})
    torch.save({"step": trainer.step, "optimizer": trainer.optimizer.state_dict(),
                "scheduler": _scheduler_state(trainer.scheduler),
                "batches": trainer.batches.state_dict(),
                "monitor": None if trainer.monitor is None else trainer.monitor.state_dict(),
                "history": trainer.history, "config": trainer.config_dict()},
               os.path.join(directory, STATE_NAME))


def load_checkpoint(directory, trainer, rank: int = 0):
    """Restore `trainer` from save_checkpoint's directory (ValueError on a config mismatch in
    what decides the model and the data order)."""
    from safetensors.torch import load_file
    state = torch.load(os.path.join(directory, STATE_NAME), weights_only=True)
    saved, current = state["config"], trainer.config_dict()
    for key in ("data", "language_share", "batch_size", "seed", "steps", "llama", "clip", "dim",
                "layers", "rank", "experts", "groups", "train_base"):
        if saved.get(key) != current.get(key):
            raise ValueError(f"--resume {directory}: checkpoint has {key}={saved.get(key)!r}, "
                             f"this run {current.get(key)!r}")
    tensors = load_file(os.path.join(directory, TRAINABLE_NAME))
    parameters = dict(trainer.module.named_parameters())
    missing = sorted(set(tensors) ^ {n for n, p in parameters.items() if p.requires_grad})
    if missing:
        raise ValueError(f"--resume {directory}: trainable parameters differ: {missing[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    trainer.optimizer.load_state_dict(state["optimizer"])
    scheduler_state = dict(state["scheduler"], base_schedule=trainer.scheduler.base_schedule)
    trainer.scheduler.load_state_dict(scheduler_state)
    trainer.batches.load_state_dict(state["batches"])
    if trainer.monitor is not None and state["monitor"] is not None:
        trainer.monitor.load_state_dict(state["monitor"])
    trainer.history, trainer.step = state["history"], state["step"]
    rng_path = os.path.join(directory, f"rng_rank{rank}.pt")
    if os.path.exists(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
