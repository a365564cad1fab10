"""Stop requests by signal: while a StopSignals is entered, SIGTERM and SIGINT only record a
request, and the training loop ends after the step in progress with a resumable checkpoint
(mlan-train's loop; StopOnSignalCallback for transformers.Trainer). Preemptible and SLURM
machines send SIGTERM some time before the kill: that time goes to one step and one save.
A second signal before the save acts at once, as it would without the handler."""
import signal
import sys
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While entered (in the main thread), SIGTERM/SIGINT only record a stop request;
    `requested()` says whether any rank got one (a collective under torch.distributed, so all
    ranks stop after the same step). Other threads: signals are left as they were."""

    def __init__(self, world_size: int = 1, device="cpu", program: str = "training"):
        self.world_size, self.device, self.program = world_size, device, program
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
        print(f"{self.program}: {signal.Signals(signum).name} received: stopping after this step "
              f"with a checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        if self.world_size == 1:
            return self.received is not None
        flag = torch.tensor([self.received or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = int(flag.item())
        return bool(flag.item())
