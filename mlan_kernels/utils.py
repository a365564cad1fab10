"""Small utilities any layer may import (this module imports nothing of the package)."""
import os
import warnings

_warned = set()      # the messages warn_once already issued (tests clear it: reset_warnings)


def warn_once(message: str) -> None:
    """Issue `message` as a RuntimeWarning the first time only (the package's one warn-once)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forget which warnings were issued, so that each is issued once again."""
    _warned.clear()


def triton_interpreter() -> bool:
    """Whether Triton runs its kernels in the interpreter (TRITON_INTERPRET=1: CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted(device) -> bool:
    """Whether Triton kernels on tensors of `device` run in the interpreter (the Triton backends
    then pick small launch sizes): anything but a CUDA device, or TRITON_INTERPRET=1."""
    return device.type != "cuda" or triton_interpreter()
