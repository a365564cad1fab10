"""Checks `mlan-train` runs before step 0, so that no training time is spent on a run that
would fail later: the device exists, every input path is a local file or directory (a missing
--llama is an error here, never a hub lookup), and every run directory can be written.
Each failure is a ValueError naming the option and what was expected."""
import contextlib
import fcntl
import os
import tempfile

import torch

from mlan_kernels.data.records import find_data_files
from .swap import find_checkpoint

CHECKPOINT_NAME = "checkpoint"
LOCK_NAME = ".mlan-train.lock"


def check_device(device: str):
    """--device cuda[:N] needs a CUDA build of torch and that many GPUs."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available to torch "
                         f"(accepted here: 'auto' or 'cpu')")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def check_paths(config):
    """--data (a .json/.jsonl file or a directory with train.json(l)), --image-folder,
    --eval-data, --predict, --llama, --clip, --tokenizer and --resume must exist locally;
    --base excludes --llama/--clip."""
    for option in ("eval_data", "predict"):
        path = getattr(config, option)
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"--{option.replace('_', '-')} {path}: not a file")
    if config.image_folder is not None and not os.path.isdir(config.image_folder):
        raise ValueError(f"--image-folder {config.image_folder}: not a directory")
    if config.base is not None and (config.llama is not None or config.clip is not None):
        raise ValueError(f"--base {config.base}: the base's LLaMA and CLIP are used; do not "
                         f"also pass --llama/--clip")
    if not config.make_data:
        try:
            find_data_files(config.data)
        except (OSError, ValueError) as error:
            raise ValueError(f"--data {config.data}: {str(error).split(': ', 1)[-1]}; or pass "
                             f"--make-data to generate the synthetic task there") from error
    for option in ("llama", "clip"):
        path = getattr(config, option)
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"--{option} {path}: expected a local HuggingFace model directory "
                             f"with config.json (checkpoints are never downloaded)")
    if config.tokenizer is not None and not os.path.exists(config.tokenizer):
        raise ValueError(f"--tokenizer {config.tokenizer}: no such file or directory")
    if config.resume and not config.shares and find_checkpoint(config.resume) is None:
        raise ValueError(f"--resume {config.resume}: no complete checkpoint there (nor a "
                         f"leftover {config.resume}.tmp / .old of an interrupted save)")
    if config.resume and config.shares and not os.path.isdir(config.resume):
        raise ValueError(f"--resume {config.resume}: with --shares/--sweep, expected the "
                         f"sweep's --out directory")


def check_run_directory(path, option="--out"):
    """Create `path` if needed and make sure files can be written in it, and that the
    checkpoint names inside it are free for directories."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path}: not a writable directory ({error.strerror or error})")
    for suffix in ("", ".tmp", ".old"):
        checkpoint = os.path.join(path, CHECKPOINT_NAME + suffix)
        if os.path.exists(checkpoint) and not os.path.isdir(checkpoint):
            raise ValueError(f"{option} {path}: {checkpoint} exists and is not a directory "
                             f"(checkpoints are written there)")


@contextlib.contextmanager
def file_lock(lock_path, wait: bool):
    """An exclusive flock on `lock_path` (created) for the `with` block; wait=False raises
    BlockingIOError at once when another process holds it. The file's text names the holder."""
    with open(lock_path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def run_lock(path, option="--out"):
    """Hold an exclusive lock on `path`/.mlan-train.lock while the run lasts (rank 0 of a
    torchrun job only; its other ranks share the directory). A second run on the same
    directory is refused at once (ValueError naming the holder's pid): two runs would overwrite
    each other's checkpoints. The kernel drops the lock when the process ends, kill -9 too."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    lock_path = os.path.join(path, LOCK_NAME)
    try:
        lock = file_lock(lock_path, wait=False)
        lock.__enter__()
    except BlockingIOError:
        try:
            with open(lock_path, encoding="utf-8") as handle:
                holder = handle.read(64).strip() or "pid unknown"
        except OSError:
            holder = "pid unknown"
        raise ValueError(f"{option} {path}: another mlan-train run is using it ({holder}, "
                         f"{lock_path}); wait for it to end or choose another {option}") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)
