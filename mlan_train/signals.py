"""SIGTERM and SIGINT during training: the step in progress finishes, a resumable checkpoint is
written, and the run ends with one line and exit status 128 + the signal's number (143 for
SIGTERM, 130 for SIGINT), as shells report a run a signal ended. Preemptible and SLURM machines
send SIGTERM some time before the kill: that time is spent on one step and one save, not lost.
A second signal before the save stops at once (the previous checkpoint stays as it was)."""
import signal
import sys
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Raised after the checkpoint of a signalled run is saved; main() reports it."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint saved in {checkpoint} "
                         f"(continue with --resume {checkpoint})")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While entered (in the main thread), SIGTERM/SIGINT only record a stop request;
    `requested()` says whether any rank got one (a collective under torch.distributed, so all
    ranks stop after the same step). Other threads: signals are left as they were."""

    def __init__(self, world_size: int = 1, device="cpu"):
        self.world_size, self.device = world_size, device
        self.received, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:               # a second signal: stop now
            previous = self._previous.get(signum, signal.SIG_DFL)
            self.__exit__()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        self.received = signum
        print(f"mlan-train: {signal.Signals(signum).name} received: stopping after this step "
              f"with a checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        if self.world_size == 1:
            return self.received is not None
        flag = torch.tensor([self.received or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = int(flag.item())
        return bool(flag.item())
