"""MixedTrainer: mixed-modality instruction tuning of a LaVIN-patched LLaMA + CLIP.

One optimizer step = `grad_accum` micro-batches from ModalityLengthBatchSampler (each one
modality; text-only batches never run CLIP), AdamW with per-side learning rates from
BalanceScheduler (cosine with warm-up × CoMMIT multipliers, our interpretation), per-side
gradient clipping with the fused scale_grads_, and a κ probe (BalanceMonitor) every
`probe_every` steps. With aux_weight λ > 0 (ours, training/auxiliary.py), a probe step first
re-forwards the batch cached at the previous probe of the same kind (image-text / text-only)
and backpropagates −λ·KL(sg(p_prev) ‖ p) into the lagging side's gradients only (before the
clip), then caches its own batch and logits. Under torch.distributed (DDP, gloo on CPU / nccl on GPU) every rank
trains on a disjoint shard of the same single-modality global batch.
"""
import contextlib
import math
import os
import time

import torch
from tqdm import tqdm

from mlan_kernels.data.collate import TokenCounter, collate
from mlan_kernels.data.dataset import split_by_modality
from mlan_kernels.data.sampler import MixtureSampler, ModalityLengthBatchSampler
from mlan_kernels.ops.grad_scale import scale_grads_
from mlan_kernels.training.auxiliary import auxiliary_kl_loss, backward_auxiliary, lagging_side
from mlan_kernels.training.balance import FEATURE, LANGUAGE, BalanceMonitor
from mlan_kernels.training.scheduler import BalanceScheduler, CosineWithWarmup
from mlan_kernels.training.stop_signals import StopSignals
from .batches import batch_to
from .evaluate import answer_mask, evaluation_counts, merge_counts, summarize_counts
from .config import max_length, options_dict
from .datasets import data_paths, load_datasets
from .model import build_model, param_groups, side_parameters, trains_base
from .signals import TrainingStopped
from .state import data_fingerprint, load_checkpoint, save_checkpoint
from .tokenizers import load_image_processor, load_tokenizer


def task_of(sample_id: str) -> str:
    """The synthetic task's id format "{split}-{index}-{task}" -> task; other ids -> "all"."""
    parts = str(sample_id).split("-")
    return parts[2] if len(parts) == 3 and parts[1].isdigit() else "all"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient with --nan-policy error: the run stops (the last
    checkpoint is kept as it was)."""


def _all_reduce_mean(values, world_size, device):
    """Mean over ranks of a list of floats; `device` is the training device (nccl needs CUDA
    tensors, gloo CPU ones)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(tensor)
        tensor /= world_size
    return tensor.tolist()


class MixedTrainer:
    def __init__(self, config, rank: int = 0, world_size: int = 1):
        if config.aux_weight > 0 and world_size > 1:
            raise ValueError("--aux-weight > 0 runs in one process only (its gradient is not "
                             "all-reduced across ranks)")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device = resolve_device(config.device)
        self.tokenizer = load_tokenizer(config)
        self.image_processor = load_image_processor(config)
        self.train_set, self.eval_set, self.load_reports = load_datasets(
            config, self.tokenizer, self.image_processor, rank)
        self.data_fingerprint = data_fingerprint(data_paths(config))    # a resume compares it
        text, image = split_by_modality(self.train_set)
        mixture = MixtureSampler(text, image, config.language_share,
                                 num_samples=config.samples_per_epoch, seed=config.seed)
        self.batches = ModalityLengthBatchSampler(
            mixture, self.train_set.lengths, self.train_set.has_image, config.batch_size,
            world_size=world_size, rank=rank, seed=config.seed)
        self._check_batches(mixture)
        self.module = build_model(config, self.tokenizer.vocab_size).to(self.device)
        self.image_tokens = self.module.image_token_count
        self.model = self.module
        if world_size > 1:
            # text-only batches leave CLIP and the neck without gradients: find_unused_parameters
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.module, find_unused_parameters=True)
        torch.manual_seed(config.seed + 1000 * rank + 3)       # dropout differs per rank
        self.optimizer = torch.optim.AdamW(
            param_groups(self.module, config.weight_decay, trains_base(config)),
            lr=config.lr, betas=(0.9, 0.95))
        self.scheduler = BalanceScheduler(
            self.optimizer, CosineWithWarmup(config.warmup_steps, config.steps, config.min_lr_ratio),
            alpha=config.balance_alpha)
        sides = side_parameters(self.optimizer)
        self.sides = [sides[FEATURE], sides[LANGUAGE]]
        self.monitor = None
        if config.probe_every:
            self.monitor = BalanceMonitor(
                lambda batch: self.module(**batch).logits, *self.sides,
                probe_every=config.probe_every, probe_mode="eval", model=self.module,
                eps=config.kappa_eps, beta=config.kappa_beta, ema=config.kappa_ema,
                min_kl=config.kappa_min_kl, skip=config.kappa_skip,
                reduce_kl=lambda *kls: tuple(_all_reduce_mean(kls, world_size, self.device)))
        # --aux-weight: {"image"|"text": (batch, logits, answer mask)} of the last probe of that
        # kind; not checkpointed (after a resume the first probe of each kind only fills it)
        self.aux_cache = {}
        self.step, self.counter = 0, None
        self.history = {"loss": [], "lr": [], "kappa": [], "eval": [], "step_seconds": [],
                        "tokens": TokenCounter().as_dict(), "probe_due": False}

    def _check_batches(self, mixture):
        """ValueError when a modality the mixture draws never fills one global batch (it would
        silently never train; with no batch at all the run would spin forever)."""
        has_image = self.train_set.has_image
        batches = self.batches.global_batches(0)
        trained = {"text": sum(not has_image[b[0]] for b in batches),
                   "image": sum(bool(has_image[b[0]]) for b in batches)}
        for modality, count in mixture.counts.items():
            if count and not trained[modality]:
                raise ValueError(
                    f"--batch-size {self.config.batch_size} x world size {self.world_size}: the "
                    f"{count} {modality} samples per epoch never fill one global batch, so "
                    f"{modality} would never train; lower --batch-size or raise --samples-per-epoch")

    def config_dict(self) -> dict:
        """The options as they take effect (defaults resolved: train_base, max_length, the
        device type) plus the world size: run.json's record and what a resume compares."""
        return options_dict(self.config) | {"train_base": trains_base(self.config),
                                                  "max_length": max_length(self.config),
                                                  "device": self.device.type,
                                                  "world_size": self.world_size}

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _batches(self):
        """Endless batch iterator across epochs (the sampler advances its epoch at the end of
        one and keeps its position for resume)."""
        while True:
            yield from self.batches

    def _micro_step(self, indices, counter, last):
        batch = collate([self.train_set[i] for i in indices], pad_id=self.tokenizer.pad_id)
        counter.add(batch, self.image_tokens)
        inputs = batch_to(batch, self.device)
        sync = contextlib.nullcontext() if last or self.world_size == 1 else self.model.no_sync()
        with sync:
            with self.autocast():
                out = self.model(**inputs)
            (out.loss / self.config.grad_accum).backward()
        return inputs, out, bool(batch["has_image"].any())        # host tensor: no sync

    def train_step(self, batch_iter, counter):
        """One optimizer step; returns (loss, probe record or None). A non-finite loss or
        gradient norm raises NonFiniteError (--nan-policy error) or skips the update."""
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for micro in range(config.grad_accum):
            inputs, out, image_batch = self._micro_step(next(batch_iter), counter,
                                                        micro + 1 == config.grad_accum)
            loss += float(out.loss.detach()) / config.grad_accum
        probe, aux = None, {}
        if config.aux_weight > 0:             # λ = 0: the code path of a run without it, exactly
            probe = self._probe_now(image_batch)
            if probe:
                aux = self._auxiliary(inputs, out, image_batch)
        # the clip reads gradients only: before the probe, which reads parameters only
        norms = scale_grads_(self.sides, [1.0, 1.0], max_norm=config.max_grad_norm or None)
        if not (math.isfinite(loss) and bool(torch.isfinite(norms).all())):
            self._non_finite(loss, norms)
            return loss, None
        if probe is None:
            probe = self.monitor is not None and self._probe_now(image_batch)
        if probe:
            self.monitor.before_step(self.step, inputs, out.logits.detach(),
                                     self._answer_mask(inputs), probe=True)
        self.optimizer.step()
        record = None
        if self.monitor is not None:
            multipliers = self.scheduler.multipliers
            record = self.monitor.after_step(loss=loss, m_feat=multipliers[FEATURE],
                                             m_lang=multipliers[LANGUAGE],
                                             grad_norm_feat=norms[0], grad_norm_lang=norms[1],
                                             image_batch=float(image_batch), **aux)
            if record is not None and record["kappa_ema"] is not None:   # None: all probes so far skipped
                self.scheduler.update_kappa(record["kappa_ema"])
        self.history["lr"].append(self.scheduler.get_last_lr()[-1])
        self.scheduler.step()
        return loss, record

    def _auxiliary(self, inputs, out, image_batch) -> dict:
        """CoMMIT's auxiliary loss at a probe step (ours; training/auxiliary.py): with a batch
        cached at the previous probe of this kind and a lagging side (κ̂ ≠ 1), re-forward that
        batch and accumulate ∂(−λ·KL(sg(p_prev) ‖ p)) into the lagging side's .grad only; then
        cache this batch with its training logits. Returns the probe record's extras:
        aux_side (1 feature, −1 language, 0 none) and aux_loss."""
        kind = "image" if image_batch else "text"
        cached = self.aux_cache.get(kind)
        side = lagging_side(self.monitor.kappa_hat)
        value = 0.0
        if cached is not None and side is not None:
            batch, previous, mask = cached
            with self.autocast():
                logits = self.module(**batch).logits
            loss = auxiliary_kl_loss(logits, previous, mask, self.config.aux_weight)
            backward_auxiliary(loss, self.sides[0] if side == FEATURE else self.sides[1])
            value = float(loss.detach())
        else:
            side = None
        self.aux_cache[kind] = (inputs, out.logits.detach(), self._answer_mask(inputs))
        return {"aux_side": {FEATURE: 1.0, LANGUAGE: -1.0, None: 0.0}[side], "aux_loss": value}

    def _answer_mask(self, inputs):
        """[B, S] bool over the assembled sequence: the logits that predict an answer token."""
        labels = self.module.assemble_labels(inputs["labels"], inputs["attention_mask"],
                                             inputs["has_image"])
        return answer_mask(labels)

    def _non_finite(self, loss, norms):
        """--nan-policy: "error" raises naming the step; "skip-step" drops this update (the
        schedule still advances, as with AMP's GradScaler) and records the step."""
        what = (f"step {self.step}: non-finite loss {loss:g} or gradient norms "
                f"(feature {float(norms[0]):g}, language {float(norms[1]):g})")
        if self.config.nan_policy == "error":
            raise NonFiniteError(f"{what}; the run stops, the last checkpoint is kept; lower "
                                 f"--lr or pass --nan-policy skip-step")
        self.optimizer.zero_grad(set_to_none=True)
        self.history.setdefault("skipped_steps", []).append(self.step)
        self.history["lr"].append(self.scheduler.get_last_lr()[-1])
        self.scheduler.step()

    def _probe_now(self, image_batch: bool) -> bool:
        """Probe when one is due (every probe_every steps from probe_start, by default the end
        of warm-up) and, with probe_on="image", the batch is image-text; otherwise the due probe
        waits for the next such batch."""
        start = self.config.probe_start
        if self.step < (self.config.warmup_steps if start is None else start):
            return False
        self.history["probe_due"] = self.history["probe_due"] or self.step % self.config.probe_every == 0
        if self.history["probe_due"] and (self.config.probe_on == "any" or image_batch):
            self.history["probe_due"] = False
            return True
        return False

    def evaluate(self):
        """Held-out results; under DDP each rank evaluates every world_size-th sample and the
        counts are merged, so every rank returns the same dict."""
        text, image = split_by_modality(self.eval_set)
        cap, shard = self.config.eval_samples, slice(self.rank, None, self.world_size)
        counts = evaluation_counts(self.module, self.eval_set,
                                   {"text": text[:cap][shard], "image": image[:cap][shard]},
                                   self.config.batch_size, self.device, self.tokenizer.pad_id,
                                   self.autocast, group_of=task_of)
        if self.world_size > 1:
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, counts)
            counts = merge_counts(gathered)
        return summarize_counts(counts)

    def train(self, stop_after: int = 0):
        """Train to config.steps (or `stop_after` more steps, then checkpoint); rank 0 returns
        the run summary dict (see report.py), other ranks None."""
        config = self.config
        if config.resume:
            found = load_checkpoint(config.resume, self, self.rank)
            self.history.setdefault("resumed", []).append({"checkpoint": found, "step": self.step})
        counter = self.counter = TokenCounter(**{key: value for key, value in self.history["tokens"].items()
                                                 if key != "total_tokens"})
        batch_iter = self._batches()
        end = config.steps if not stop_after else min(config.steps, self.step + stop_after)
        bar = tqdm(total=end, initial=self.step, disable=not config.progress or self.rank != 0,
                   desc=f"share {config.language_share:g}", dynamic_ncols=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        first, stop = self.step, StopSignals(self.world_size, self.device, "mlan-train")
        with stop:
            self._run_steps(end, batch_iter, counter, bar, stop)
        bar.close()
        if stop.received is not None:
            self.save()
            raise TrainingStopped(stop.received, self.step, os.path.join(config.out, "checkpoint"))
        self._refuse_all_skipped(first)
        if self.step >= config.steps and self._final_eval_missing():
            self._record_eval()
        self.save()
        totals = self._across_ranks()
        return self.summary(totals) if self.rank == 0 else None

    def _refuse_all_skipped(self, first):
        """NonFiniteError when every step of this invocation was skipped (--nan-policy
        skip-step): nothing was trained; the last checkpoint stays as it was."""
        ran = self.step - first
        skipped = [step for step in self.history.get("skipped_steps", []) if first <= step < self.step]
        if ran and len(skipped) == ran:
            raise NonFiniteError(f"every one of the {ran} steps ({first} to {self.step - 1}) was "
                                 f"skipped for a non-finite loss or gradient (--nan-policy skip-step): "
                                 f"nothing was trained; lower --lr or check the data")

    def _run_steps(self, end, batch_iter, counter, bar, stop):
        config = self.config
        while self.step < end and not stop.requested():
            start = time.perf_counter()
            loss, record = self.train_step(batch_iter, counter)
            seconds = time.perf_counter() - start - (record["probe_seconds"] if record else 0.0)
            self.history["loss"].append(loss)
            self.history["step_seconds"].append(seconds)
            if record is not None:
                self.history["kappa"].append(record)
            self.step += 1
            if config.eval_every and self.step % config.eval_every == 0:
                self._record_eval()
            if config.save_every and self.step % config.save_every == 0:
                self.save()
            bar.update(1)
            if self.step % config.log_every == 0:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.history['lr'][-1]:.2e}")

    def _across_ranks(self) -> dict:
        """Collectives every rank joins at the end: global token counts, the rank-mean loss
        curve, and the largest weight difference between ranks (0.0 = in sync)."""
        tokens = dict(self.history["tokens"])
        losses = self.history["loss"]
        if self.world_size > 1:
            keys = sorted(tokens)
            summed = torch.tensor([float(tokens[key]) for key in keys], dtype=torch.float64,
                                  device=self.device)
            torch.distributed.all_reduce(summed)
            tokens = {key: int(value) for key, value in zip(keys, summed.tolist())}
            losses = _all_reduce_mean(losses, self.world_size, self.device)
        return {"tokens": tokens, "loss": losses, "rank_weight_max_diff": self.rank_weight_difference()}

    def _final_eval_missing(self) -> bool:
        """Whether no evaluation was recorded at this step, decided by rank 0 and broadcast: every
        rank must agree, since the evaluation gathers counts from all of them (a checkpoint of
        an older version holds evaluations in rank 0's history only)."""
        last = self.history["eval"][-1]["step"] if self.history["eval"] else None
        missing = torch.tensor([int(last != self.step)], device=self.device)
        if self.world_size > 1:
            torch.distributed.broadcast(missing, 0)
        return bool(missing.item())

    def _record_eval(self):
        self.history["eval"].append({"step": self.step, **self.evaluate()})

    def save(self, directory=None):
        if self.counter is not None:
            self.history["tokens"] = self.counter.as_dict()
        save_checkpoint(directory or os.path.join(self.config.out, "checkpoint"), self,
                        self.rank, self.world_size)

    def rank_weight_difference(self) -> float:
        """max |w_rank - w_rank0| over all trainable parameters (0.0 when ranks agree)."""
        if self.world_size == 1:
            return 0.0
        worst = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.module.parameters():
            if p.requires_grad:
                reference = p.detach().clone()
                torch.distributed.broadcast(reference, 0)
                worst = torch.maximum(worst, (p.detach() - reference).abs().max().double())
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        return float(worst)

    def summary(self, totals: dict) -> dict:
        from .report import run_summary
        return run_summary(self, totals)
