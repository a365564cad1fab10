"""Checkpoints of the training program, for exact resumption.

A checkpoint directory holds
    adapters/                 save_adapters(): adapters + neck + modality token (what users ship)
    trainable.safetensors     every trainable parameter by name (the base too with --train-base)
    trainer_state.pt          step, optimizer, scheduler, batch-sampler position, κ̂ monitor,
                              history (losses, κ trace, token counts), config
    rank{r}.pt                rank r's torch RNG state (adapter dropout seeds come from it) and
                              history (its shard's losses and token counts)
Loading restores all of it, so a resumed run continues with bit-identical losses (CPU,
deterministic kernels). torch.load uses weights_only=True: nothing in it executes code.
"""
import os
import shutil

import torch

from ...checkpoint import save_adapters

STATE_NAME, TRAINABLE_NAME, RANK_NAME = "trainer_state.pt", "trainable.safetensors", "rank{rank}.pt"
# options that decide the model, the data order or the schedule: a resume must not change them
RESUME_KEYS = ("data", "language_share", "samples_per_epoch", "batch_size", "grad_accum", "seed",
               "steps", "warmup_steps", "llama", "clip", "dim", "layers", "heads", "clip_dim",
               "clip_layers", "image_size", "patch_size", "max_length", "rank", "experts", "groups",
               "train_base", "probe_every", "probe_on", "balance_alpha", "kappa_eps", "world_size")


def _scheduler_state(scheduler) -> dict:
    state = scheduler.state_dict()
    state.pop("base_schedule", None)          # rebuilt from the config (not a plain type)
    return state


def _barrier(world_size):
    if world_size > 1:
        torch.distributed.barrier()


def save_checkpoint(directory, trainer, rank: int = 0, world_size: int = 1):
    """Write the checkpoint of `trainer` (a MixedTrainer) to `directory`, all ranks together:
    everything goes to `directory`.tmp first and replaces `directory` only when complete, so a
    crash mid-save leaves the previous checkpoint intact. Every rank writes its RNG state and
    its own history (losses and token counts of its shard); rank 0 writes the rest."""
    from safetensors.torch import save_file
    directory = os.path.normpath(directory)
    staging, old = directory + ".tmp", directory + ".old"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    _barrier(world_size)
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                "history": trainer.history},
               os.path.join(staging, RANK_NAME.format(rank=rank)))
    if rank == 0:
        module = trainer.module
        save_adapters(module, os.path.join(staging, "adapters"))
        trainable = {name: p.detach().to("cpu").contiguous()
                     for name, p in module.named_parameters() if p.requires_grad}
        save_file(trainable, os.path.join(staging, TRAINABLE_NAME), metadata={"format": "pt"})
        torch.save({"step": trainer.step, "optimizer": trainer.optimizer.state_dict(),
                    "scheduler": _scheduler_state(trainer.scheduler),
                    "batches": trainer.batches.state_dict(),
                    "monitor": None if trainer.monitor is None else trainer.monitor.state_dict(),
                    "history": trainer.history, "config": trainer.config_dict()},
                   os.path.join(staging, STATE_NAME))
    _barrier(world_size)
    if rank == 0:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(directory):
            os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(world_size)


def load_checkpoint(directory, trainer, rank: int = 0):
    """Restore `trainer` from save_checkpoint's directory (ValueError when an option that
    decides the model, the data order or the schedule differs, or a rank's state is missing)."""
    from safetensors.torch import load_file
    state = torch.load(os.path.join(directory, STATE_NAME), weights_only=True)
    saved, current = state["config"], trainer.config_dict()
    for key in RESUME_KEYS:
        if saved.get(key) != current.get(key):
            raise ValueError(f"--resume {directory}: checkpoint has {key}={saved.get(key)!r}, "
                             f"this run {current.get(key)!r}")
    rank_path = os.path.join(directory, RANK_NAME.format(rank=rank))
    if not os.path.exists(rank_path):
        raise ValueError(f"--resume {directory}: no state for rank {rank} ({rank_path})")
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
    rank_state = torch.load(rank_path, weights_only=True)
    trainer.history, trainer.step = rank_state["history"], state["step"]
    torch.set_rng_state(rank_state["cpu"])
    if rank_state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rank_state["cuda"])
