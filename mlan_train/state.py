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
The directory is replaced crash-safely (swap.py); COMPLETE marks a whole checkpoint.
"""
import hashlib
import os

import torch

from mlan_kernels.integrations.checkpoint import save_adapters
from mlan_kernels.integrations.checkpoint_validation import check_tensor_layout, load_torch_file
from .swap import find_checkpoint, mark_complete, recover, staging_path, swap_in

STATE_NAME, TRAINABLE_NAME, RANK_NAME = "trainer_state.pt", "trainable.safetensors", "rank{rank}.pt"
# The options a resume may change: they decide how often to evaluate, log and save, where
# output goes, how this invocation runs (threads, progress bar, plots, when to stop) and what
# is measured after training. Every other option decides the model, the data, the data order,
# the optimization or the schedule, and must equal the checkpoint's (else the run refuses).
STATE_KEYS = ("step", "optimizer", "scheduler", "batches", "monitor", "history", "config")
RESUME_MAY_CHANGE = ("out", "resume", "eval_every", "log_every", "save_every", "progress",
                     "plots", "threads", "stop_after", "compare_backends", "make_data", "shares",
                     "sweep", "predict", "max_new_tokens")


def _scheduler_state(scheduler) -> dict:
    state = scheduler.state_dict()
    state.pop("base_schedule", None)          # rebuilt from the config (not a plain type)
    return state


def _barrier(world_size):
    if world_size > 1:
        torch.distributed.barrier()


def save_checkpoint(directory, trainer, rank: int = 0, world_size: int = 1):
    """Write the checkpoint of `trainer` (a MixedTrainer) to `directory`, all ranks together.
    Everything goes to `directory`.tmp first and replaces `directory` only when complete (see
    swap.py): a crash at any point leaves the newest complete checkpoint findable by
    find_checkpoint. Every rank writes its RNG state and its own history (losses and token
    counts of its shard); rank 0 writes the rest. Non-finite weights are never saved. A write
    that fails (a full disk: torch.save and safetensors raise their own error types) is an
    OSError naming the checkpoint; the previous checkpoint stays."""
    from safetensors import SafetensorError
    try:
        _save_checkpoint(directory, trainer, rank, world_size)
    except (RuntimeError, SafetensorError) as error:
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise OSError(f"saving the checkpoint {directory} failed ({message[:200]}); the previous "
                      f"checkpoint is kept") from None


def _save_checkpoint(directory, trainer, rank, world_size):
    from safetensors.torch import save_file
    directory = os.path.normpath(directory)
    staging = staging_path(directory)
    if rank == 0:
        _check_finite_parameters(trainer.module, f"step {trainer.step}: refusing to save")
        recover(directory)
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
                    "history": trainer.history, "config": trainer.config_dict(),
                    "data": trainer.data_fingerprint},
                   os.path.join(staging, STATE_NAME))
    _barrier(world_size)
    if rank == 0:
        mark_complete(staging, trainer.step)
        swap_in(directory)
    _barrier(world_size)


def data_fingerprint(paths) -> dict:
    """{file name: {"bytes": size, "sha256": hex digest}} of the data files a run reads (None
    entries skipped): a resume compares it, so a different dataset at the same path is refused."""
    fingerprint = {}
    for path in filter(None, paths):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        fingerprint[os.path.basename(path)] = {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}
    return fingerprint


def _refuse_changed_data(where, saved, current):
    """ValueError when a data file differs from the one the checkpoint trained on (checkpoints
    written before fingerprints existed hold none: nothing to compare)."""
    if saved is None:
        return
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) != current.get(name):
            before, now = (str((side.get(name) or {}).get("sha256"))[:12] for side in (saved, current))
            raise ValueError(f"--resume {where}: the data file {name} differs from the one the "
                             f"checkpoint trained on (sha256 {before}..., now {now}...); resume with the same data")


def _read_state(found, name, keys=()):
    """A checkpoint's torch file, checked (load_torch_file: whole, bounded, no expanded
    tensors) and a dict holding `keys`; errors name --resume and the file."""
    path = os.path.join(found, name)
    state = load_torch_file(path, f"--resume {found}: {name}")
    missing = [key for key in keys if key not in state] if isinstance(state, dict) else list(keys)
    if not isinstance(state, dict) or missing:
        raise ValueError(f"--resume {found}: {name} is not a trainer checkpoint (missing {missing})")
    return state


def _read_trainable(found):
    from safetensors.torch import load_file
    path = os.path.join(found, TRAINABLE_NAME)
    try:
        tensors = load_file(path)
    except Exception as error:        # SafetensorError (truncated, bad header), OSError, ...
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"--resume {found}: {TRAINABLE_NAME} unreadable ({message[:160]})") from None
    for name, tensor in tensors.items():
        check_tensor_layout(tensor, f"--resume {found}: {TRAINABLE_NAME} tensor {name!r}")
    return tensors


def _check_finite_parameters(module, context):
    for name, parameter in module.named_parameters():
        if parameter.requires_grad and not bool(torch.isfinite(parameter.detach()).all()):
            raise FloatingPointError(f"{context}: parameter {name} holds non-finite values")


def changed_options(saved: dict, current: dict, defaults: dict) -> list:
    """[(option, checkpoint value, this run's value)] for every option outside
    RESUME_MAY_CHANGE that differs; an option the checkpoint predates counts as its default."""
    changed = []
    for key, value in current.items():
        if key in RESUME_MAY_CHANGE:
            continue
        before = saved.get(key, defaults.get(key))
        if before != value:
            changed.append((key, before, value))
    return changed


def _refuse_changed_options(where, saved, current):
    from .config import TrainConfig, options_dict
    changed = changed_options(saved, current, options_dict(TrainConfig()))
    if changed:
        listed = "; ".join(f"--{key.replace('_', '-')}: checkpoint {before!r}, this run {value!r}"
                           for key, before, value in changed)
        allowed = ", ".join("--" + key.replace("_", "-") for key in RESUME_MAY_CHANGE)
        raise ValueError(f"--resume {where}: options differ from the checkpoint's ({listed}); "
                         f"only {allowed} may change on resume")


def _check_state(where, state, tensors, steps):
    """The restored step is an int in [0, steps]; weights and optimizer state are finite."""
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= steps:
        raise ValueError(f"--resume {where}: trainer step {step!r} is not an int in [0, --steps "
                         f"{steps}]")
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"--resume {where}: parameter {name} holds non-finite values")
    entries = state["optimizer"].get("state", {}) if isinstance(state["optimizer"], dict) else None
    if not isinstance(entries, dict) or not all(isinstance(entry, dict) for entry in entries.values()):
        raise ValueError(f"--resume {where}: the optimizer state is not torch's {{'state': {{index: "
                         f"{{...}}}}, ...}}")
    for index, entry in entries.items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(
                    torch.isfinite(value).all()):
                raise ValueError(f"--resume {where}: optimizer state {key} of parameter "
                                 f"{index} holds non-finite values")


def load_checkpoint(directory, trainer, rank: int = 0) -> str:
    """Restore `trainer` from the newest complete checkpoint at `directory` (see
    find_checkpoint; returns its path). Everything is read and checked before the trainer is
    touched: ValueError when an option outside RESUME_MAY_CHANGE differs (naming each one and
    both values), a rank's state is missing, the step is outside [0, steps] or a weight or
    optimizer state is not finite."""
    found = find_checkpoint(directory)
    if found is None:
        raise ValueError(f"--resume {directory}: no complete checkpoint there (nor a leftover "
                         f"{directory}.tmp / .old of an interrupted save)")
    state = _read_state(found, STATE_NAME, STATE_KEYS)
    if not isinstance(state["config"], dict):
        raise ValueError(f"--resume {found}: {STATE_NAME}'s config is not a dict")
    _refuse_changed_options(found, state["config"], trainer.config_dict())
    _refuse_changed_data(found, state.get("data"), trainer.data_fingerprint)
    rank_name = RANK_NAME.format(rank=rank)
    if not os.path.exists(os.path.join(found, rank_name)):
        raise ValueError(f"--resume {found}: no state for rank {rank} ({os.path.join(found, rank_name)})")
    tensors = _read_trainable(found)
    parameters = dict(trainer.module.named_parameters())
    missing = sorted(set(tensors) ^ {n for n, p in parameters.items() if p.requires_grad})
    if missing:
        raise ValueError(f"--resume {found}: trainable parameters differ: {missing[:5]}")
    _check_state(found, state, tensors, trainer.config.steps)
    rank_state = _read_state(found, rank_name, ("cpu", "cuda", "history"))
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    trainer.optimizer.load_state_dict(state["optimizer"])
    scheduler_state = dict(state["scheduler"], base_schedule=trainer.scheduler.base_schedule)
    trainer.scheduler.load_state_dict(scheduler_state)
    trainer.batches.load_state_dict(state["batches"])
    if trainer.monitor is not None and state["monitor"] is not None:
        trainer.monitor.load_state_dict(state["monitor"])
    trainer.history, trainer.step = rank_state["history"], state["step"]
    torch.set_rng_state(rank_state["cpu"])
    if rank_state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rank_state["cuda"])
    return found
