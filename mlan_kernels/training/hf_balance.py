"""CoMMIT balancing for transformers.Trainer: BalanceCallback (κ probes, per-side LR multipliers
on Trainer's LambdaLR schedule, JSONL rows, balance plot). Used with MlanTrainer (hf_trainer.py),
which builds the side-tagged param groups, keeps each micro-batch for the probes and restores
the callback's state on resume.
"""
import json
import os
import warnings
from typing import Optional, Sequence

import torch
from transformers import TrainerCallback

from ..integrations.lavin import LavinModel
from .balance import FEATURE, LANGUAGE, BalanceMonitor, check_kappa_hat, check_monitor_settings
from .scheduler import GROUP_KEY, balance_multipliers, check_balance_settings

BALANCE_STATE_NAME = "balance_state.json"


def _lavin(model: torch.nn.Module) -> LavinModel:
    lavin = next((m for m in model.modules() if isinstance(m, LavinModel)), None)
    if lavin is None:
        raise ValueError(f"model must contain a LavinModel (build_lavin), got {type(model).__name__}")
    return lavin


def _to_device(batch: dict, device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def read_balance_state(path) -> dict:
    """{"kappa_hat": None or a finite float > 0, "probe_due": bool} of a checkpoint's
    balance_state.json; anything else (NaN, a string, a missing key, not JSON) is a ValueError
    naming the file: a NaN κ̂ would make every learning rate, then every parameter, NaN."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: a balance state must be a regular file")
    if os.path.getsize(path) > 4096:
        raise ValueError(f"{path}: {os.path.getsize(path)} bytes; a balance state is a few bytes")
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except ValueError as error:
        raise ValueError(f"{path}: not a JSON balance state ({error})") from None
    if not isinstance(saved, dict) or set(saved) != {"kappa_hat", "probe_due"}:
        raise ValueError(f"{path}: expected {{\"kappa_hat\": ..., \"probe_due\": ...}}, got {saved!r:.120}")
    check_kappa_hat(saved["kappa_hat"], f"{path}: kappa_hat")
    if not isinstance(saved["probe_due"], bool):
        raise ValueError(f"{path}: probe_due must be true or false, got {saved['probe_due']!r}")
    return saved


class BalanceCallback(TrainerCallback):
    """CoMMIT for Trainer: a κ probe every `probe_every` optimizer steps (BalanceMonitor,
    probe_mode "eval": three no-grad forwards of the step's last micro-batch), per-side LR
    multipliers m = balance_multipliers(κ̂, alpha, clip) applied by Trainer's own LambdaLR
    schedule (lr_side(t) = lr · schedule(t) · m_side; a κ̂ update acts from the next step on),
    one JSONL row per probe in output_dir/`log_name` and output_dir/balance.png at the end
    (world process zero). Needs MlanTrainer (it reads the micro-batch and the side groups).

    start_step: the first optimizer step a probe may run; None = the Trainer's warm-up steps
    (args.get_warmup_steps(max_steps)): during warm-up the LR is near 0, so κ measures rounding
    and would seed κ̂ with it. probe_on: "any", or "image" to move a due probe to the next
    image-text step. Under several processes the two KLs are averaged over ranks, so κ̂ and the
    LRs agree everywhere.
    `lr_history`: per step {"step", "lr_feature", "lr_language", "m_feat", "m_lang"}.
    """

    def __init__(self, probe_every: int = 10, alpha: float = 0.5, clip: Sequence[float] = (0.1, 10.0),
                 beta: float = 0.9, eps: float = 1e-12, probe_on: str = "any",
                 log_name: Optional[str] = "balance.jsonl", plot: bool = True,
                 start_step: Optional[int] = None):
        if not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"probe_every must be a positive int, got {probe_every!r}")
        if start_step is not None and (not isinstance(start_step, int) or start_step < 0):
            raise ValueError(f"start_step must be None or an int >= 0, got {start_step!r}")
        check_balance_settings(alpha, clip)
        check_monitor_settings(beta, eps)
        if probe_on not in ("any", "image"):
            raise ValueError(f"probe_on must be 'any' or 'image', got {probe_on!r}")
        self.probe_every, self.alpha, self.clip, self.beta, self.eps = probe_every, alpha, tuple(clip), beta, eps
        self.probe_on, self.log_name, self.plot, self.start_step = probe_on, log_name, plot, start_step
        self.trainer, self.monitor, self.lr_history = None, None, []
        self._kappa_hat, self._probe_due, self._probing, self._start = None, False, False, 0

    def bind(self, trainer):
        self.trainer = trainer

    @property
    def kappa_hat(self) -> Optional[float]:
        return self.monitor.kappa_hat if self.monitor is not None else self._kappa_hat

    @property
    def multipliers(self) -> dict:
        """{"feature": m_feat, "language": m_lang} in effect (1, 1 before the first probe)."""
        return balance_multipliers(self.kappa_hat, self.alpha, self.clip)

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self.trainer is None:
            raise ValueError("BalanceCallback needs MlanTrainer (pass it in callbacks=[...])")
        groups = optimizer.param_groups
        for index, group in enumerate(groups):
            if group.get(GROUP_KEY) not in (FEATURE, LANGUAGE):
                raise ValueError(f"optimizer param group {index} has no {GROUP_KEY!r} tag; build "
                                 f"the optimizer with MlanTrainer / side_param_groups")
        sides = {side: [p for g in groups if g[GROUP_KEY] == side for p in g["params"]]
                 for side in (FEATURE, LANGUAGE)}
        module = self.trainer.model                   # not DDP / compiled: probes are local
        log_path = (os.path.join(args.output_dir, self.log_name)
                    if self.log_name and state.is_world_process_zero else None)
        if log_path:
            os.makedirs(args.output_dir, exist_ok=True)
        self.monitor = BalanceMonitor(lambda batch: module(**batch).logits, sides[FEATURE],
                                      sides[LANGUAGE], probe_every=self.probe_every, beta=self.beta,
                                      eps=self.eps, probe_mode="eval", model=module,
                                      log_path=log_path, reduce_kl=self._reduce_kl)
        self.monitor.kappa_hat = self._kappa_hat
        self._start = (args.get_warmup_steps(state.max_steps) if self.start_step is None
                       else self.start_step)
        if getattr(self.trainer, "is_deepspeed_enabled", False):
            self.probe_every = 0
            warnings.warn("BalanceCallback: no κ probes under DeepSpeed (its engine steps inside "
                          "backward, before the probe could copy θ_t, φ_t); LR multipliers keep "
                          "their current value", stacklevel=2)
        if self.alpha:
            self._scale_schedule(lr_scheduler, groups)

    def _scale_schedule(self, scheduler, groups):
        """Multiply each group's LambdaLR factor by the current multiplier of its side."""
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(f"BalanceCallback(alpha={self.alpha}) needs a LambdaLR schedule "
                             f"(lr_scheduler_type linear/cosine/constant/...), got "
                             f"{type(scheduler).__name__}; pass alpha=0 to only probe")

        def scaled(base, side):
            return lambda step: base(step) * self.multipliers[side]     # closure: not pickled
        scheduler.lr_lambdas = [scaled(base, group[GROUP_KEY])
                                for base, group in zip(scheduler.lr_lambdas, groups)]

    @staticmethod
    def _reduce_kl(kl_feat: float, kl_lang: float) -> tuple:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return kl_feat, kl_lang
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        values = torch.tensor([kl_feat, kl_lang], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(values)
        return tuple((values / torch.distributed.get_world_size()).tolist())

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        lrs = {side: None for side in (FEATURE, LANGUAGE)}
        for group in self.trainer.optimizer.param_groups:
            lrs[group[GROUP_KEY]] = group["lr"]
        multipliers = self.multipliers
        self.lr_history.append({"step": state.global_step, "lr_feature": lrs[FEATURE],
                                "lr_language": lrs[LANGUAGE], "m_feat": multipliers[FEATURE],
                                "m_lang": multipliers[LANGUAGE]})
        inputs = self.trainer.last_inputs
        if not self.probe_every:
            return
        if state.global_step < self._start:
            return
        image_batch = bool(inputs["has_image"].any())
        self._probe_due = self._probe_due or state.global_step % self.probe_every == 0
        self._probing = self._probe_due and (self.probe_on == "any" or image_batch)
        if not self._probing:
            return
        self._probe_due = False
        module = self.trainer.model
        batch = _to_device(inputs, next(module.parameters()).device)
        labels = _lavin(module).assemble_labels(batch["labels"], batch["attention_mask"], batch["has_image"])
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100                # logits that predict an answer token
        self.monitor.before_step(state.global_step, batch, None, mask, probe=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self._probing:
            return
        self._probing = False
        last = self.lr_history[-1]
        loss = self.trainer.last_loss
        self.monitor.after_step(loss=loss if loss is not None else float("nan"), m_feat=last["m_feat"],
                                m_lang=last["m_lang"], lr_feature=last["lr_feature"],
                                lr_language=last["lr_language"],
                                image_batch=float(self.trainer.last_inputs["has_image"].any()))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(directory):
                with open(os.path.join(directory, BALANCE_STATE_NAME), "w") as handle:
                    json.dump({"kappa_hat": self.kappa_hat, "probe_due": self._probe_due}, handle)

    def read_checkpoint(self, directory: str) -> Optional[dict]:
        """The checked balance state of a checkpoint folder (read_balance_state); None when
        it has none."""
        path = os.path.join(directory, BALANCE_STATE_NAME)
        return read_balance_state(path) if os.path.exists(path) else None

    def restore(self, saved: Optional[dict]):
        """Take κ̂ and a pending probe from read_checkpoint's result (None: nothing to do)."""
        if saved is not None:
            self._kappa_hat, self._probe_due = saved["kappa_hat"], saved["probe_due"]
            if self.monitor is not None:
                self.monitor.kappa_hat = self._kappa_hat

    def load_checkpoint(self, directory: str):
        """Restore κ̂ and a pending probe from a checkpoint folder (no file: nothing to do)."""
        self.restore(self.read_checkpoint(directory))

    def on_train_end(self, args, state, control, **kwargs):
        if not (self.plot and state.is_world_process_zero and self.monitor and self.monitor.records):
            return
        try:
            from .plot import plot_balance
            plot_balance(self.monitor.records, os.path.join(args.output_dir, "balance.png"))
        except ImportError as error:                  # matplotlib is the `bench` extra
            warnings.warn(f"balance plot skipped: {error}", stacklevel=2)
