"""SIGTERM and SIGINT during training: the step in progress finishes, a resumable checkpoint is
written, and the run ends with one line and exit status 128 + the signal's number (143 for
SIGTERM, 130 for SIGINT), as shells report a run a signal ended. Preemptible and SLURM machines
send SIGTERM some time before the kill: that time is spent on one step and one save, not lost.
A second signal before the save stops at once (the previous checkpoint stays as it was)."""
import signal




class TrainingStopped(Exception):
    """Raised after the checkpoint of a signalled run is saved; main() reports it."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        super().__init__(signum, step, checkpoint)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.resume = checkpoint          # what --resume takes (a sweep's: its --out)

    def __str__(self) -> str:
        return (f"stopped by {signal.Signals(self.signum).name} after step {self.step}; checkpoint "
                f"saved in {self.checkpoint} (continue with --resume {self.resume})")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum
