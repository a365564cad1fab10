"""transformers.Trainer integration: MLAN mixtures, CoMMIT balancing and adapter-only checkpoints
for pipelines that already train with `Trainer` / accelerate (LLaVA, MLAN).

    trainer = MlanTrainer(model=lavin, args=TrainingArguments(...), train_dataset=dataset,
                          data_collator=MlanCollator(tokenizer.pad_id), language_share=0.5,
                          callbacks=[BalanceCallback(probe_every=10)])
    trainer.train()                                  # later: train(resume_from_checkpoint=True)
    load_adapters(fresh_lavin, "out/checkpoint-100")  # every save is adapter-only

What MlanTrainer changes in Trainer (everything else — DDP, DeepSpeed, FSDP, gradient
accumulation, mixed precision, torch_compile, logging — stays Trainer's):
- get_train_dataloader: MixtureSampler (exact text/image share per epoch) + ModalityLength-
  BatchSampler (one modality per global batch, length-grouped). Every rank builds the same global
  batches and takes its own slice, so all ranks see the same modality at every micro-step
  (accelerate's batch-sampler sharding is bypassed, as Trainer does for its own rank-aware one).
- create_optimizer: Trainer's optimizer class and kwargs over one param group per CoMMIT side
  (tagged "balance_group"; each split into decay / no-decay when weight_decay > 0).
- _save / _load_from_checkpoint: adapter_model.safetensors + adapter_config.json (save_adapters,
  loadable by load_adapters), plus a PEFT model's own adapters under peft/; resume goes through
  Trainer's resume_from_checkpoint (optimizer, scheduler, RNG and sampler position are Trainer's).
- gradient checkpointing of a model that is not a PreTrainedModel (LavinModel): enabled
  non-reentrant on each HF sub-model (Trainer would call a method the model lacks).
BalanceCallback adds κ probes, per-side LR multipliers on Trainer's LambdaLR schedule, JSONL rows
and the balance plot. Needs `accelerate` (transformers' Trainer does): extra `mlan-kernels[hf]`.
"""
import json
import os
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from ..checkpoint import WEIGHTS_NAME, adapter_state_dict, load_adapters, save_adapters
from ..data.collate import collate
from ..data.dataset import split_by_modality
from ..data.sampler import MixtureSampler, ModalityLengthBatchSampler
from ..integrations.hf_compat import enable_gradient_checkpointing
from ..integrations.lavin import LavinModel
from .balance import FEATURE, LANGUAGE, BalanceMonitor
from .scheduler import GROUP_KEY, balance_multipliers

FEATURE_PARTS = frozenset({"clip", "neck", "modality_embedding"})
BALANCE_STATE_NAME = "balance_state.json"
PEFT_FOLDER = "peft"


class MlanCollator:
    """InstructionDataset samples -> LavinModel.forward kwargs (collate without "ids"):
    input_ids / attention_mask / labels [B, T], pixel_values [B_img, 3, H, W] or None,
    has_image [B]. A class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, samples: list) -> dict:
        batch = collate(samples, pad_id=self.pad_id)
        batch.pop("ids")
        return batch


def side_of_name(name: str) -> str:
    """CoMMIT side of a parameter by its qualified name: any "clip" / "neck" / "modality_embedding"
    component -> feature, else language (LLaMA adapters, LoRA on LLaMA). Wrapper prefixes
    ("base_model.model.", "module.") do not matter."""
    return FEATURE if FEATURE_PARTS & set(name.split(".")) else LANGUAGE


def side_param_groups(model: torch.nn.Module, weight_decay: float = 0.0,
                      side_of: Optional[Callable[[str], str]] = None) -> list:
    """Optimizer param groups of the trainable parameters, tagged GROUP_KEY = side: one per side,
    or per side two (≥2-D weights with `weight_decay`, 1-D ones without) when weight_decay > 0.
    side_of(name) -> "feature" | "language" (default side_of_name). Empty groups are left out."""
    side_of = side_of or side_of_name
    sides = {FEATURE: [], LANGUAGE: []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            side = side_of(name)
            if side not in sides:
                raise ValueError(f"side_of must return 'feature' or 'language', got {side!r} for {name}")
            sides[side].append(parameter)
    if not sides[FEATURE] and not sides[LANGUAGE]:
        raise ValueError("model has no trainable parameters (patch it / unfreeze adapters first)")
    groups = []
    for side, params in sides.items():
        splits = [(params, weight_decay)] if not weight_decay else [
            ([p for p in params if p.dim() >= 2], weight_decay),
            ([p for p in params if p.dim() < 2], 0.0)]
        groups += [{"params": chosen, "weight_decay": decay, GROUP_KEY: side}
                   for chosen, decay in splits if chosen]
    return groups


def _lavin(model: torch.nn.Module) -> LavinModel:
    lavin = next((m for m in model.modules() if isinstance(m, LavinModel)), None)
    if lavin is None:
        raise ValueError(f"model must contain a LavinModel (build_lavin), got {type(model).__name__}")
    return lavin


def _to_device(batch: dict, device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


class MlanTrainer(Trainer):
    """Trainer with the MLAN sampler, per-side param groups and adapter-only checkpoints.

    train_dataset: an InstructionDataset (anything with `lengths` and `has_image` lists).
    language_share: text fraction of each epoch's mixture (None: the dataset's own share, i.e.
    all of it); samples_per_epoch: mixture size n (None: the largest that fits);
    mixture_seed: default args.seed; mega_batch_size / group_by_length: as in
    ModalityLengthBatchSampler; side_of: see side_param_groups. Other arguments are Trainer's.
    """

    def __init__(self, *args, language_share: Optional[float] = None,
                 samples_per_epoch: Optional[int] = None, mixture_seed: Optional[int] = None,
                 mega_batch_size: Optional[int] = None, group_by_length: bool = True,
                 side_of: Optional[Callable[[str], str]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.language_share, self.samples_per_epoch = language_share, samples_per_epoch
        self.mixture_seed = self.args.seed if mixture_seed is None else mixture_seed
        self.mega_batch_size, self.group_by_length, self.side_of = mega_batch_size, group_by_length, side_of
        self.last_inputs, self.last_loss, self.train_batch_sampler = None, None, None
        self._warned_uncovered = False
        self._checkpoint_parts()
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, BalanceCallback):
                callback.bind(self)

    def add_callback(self, callback):
        super().add_callback(callback)
        for added in self.callback_handler.callbacks:
            if isinstance(added, BalanceCallback) and added.trainer is None:
                added.bind(self)

    def _checkpoint_parts(self):
        """(gradient|activation)_checkpointing on a model without Trainer's enable method: turn
        it on, non-reentrant, in each outermost HF sub-model and clear the flag for Trainer."""
        flags = [n for n in ("activation_checkpointing", "gradient_checkpointing") if getattr(self.args, n, False)]
        model = self.model
        if not flags or any(hasattr(model, m) for m in ("activation_checkpointing_enable",
                                                        "gradient_checkpointing_enable")):
            return
        options = dict(getattr(self.args, "activation_checkpointing_kwargs", None)
                       or getattr(self.args, "gradient_checkpointing_kwargs", None) or {})
        parts, inside = [], set()
        for module in model.modules():
            if id(module) not in inside and getattr(module, "supports_gradient_checkpointing", False):
                parts.append(module)
                inside.update(id(child) for child in module.modules())
        if not parts:
            raise ValueError(f"args.gradient_checkpointing: {type(model).__name__} has no "
                             f"HuggingFace sub-model that supports gradient checkpointing")
        for part in parts:
            enable_gradient_checkpointing(part, **options)
        for name in flags:
            setattr(self.args, name, False)

    # ---- data -------------------------------------------------------------------------------
    def build_batch_sampler(self, dataset) -> ModalityLengthBatchSampler:
        """This rank's ModalityLengthBatchSampler over `dataset` (see the class docstring)."""
        if not hasattr(dataset, "lengths") or not hasattr(dataset, "has_image"):
            raise ValueError(f"train_dataset must have `lengths` and `has_image` (an "
                             f"InstructionDataset), got {type(dataset).__name__}")
        text, image = split_by_modality(dataset)
        share = self.language_share
        if share is None:
            share = len(text) / max(len(text) + len(image), 1)
        mixture = MixtureSampler(text, image, share, num_samples=self.samples_per_epoch,
                                 seed=self.mixture_seed)
        batches = ModalityLengthBatchSampler(
            mixture, dataset.lengths, dataset.has_image, self._train_batch_size,
            world_size=self.args.world_size, rank=self.args.process_index,
            mega_batch_size=self.mega_batch_size, seed=self.mixture_seed,
            group_by_length=self.group_by_length)
        if len(batches) == 0:
            raise ValueError(f"per_device_train_batch_size {self._train_batch_size} x world size "
                             f"{self.args.world_size}: the mixture never fills one global batch")
        return batches

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("train_dataset is required for training, got None")
        batches = self.train_batch_sampler = self.build_batch_sampler(self.train_dataset)
        loader = DataLoader(self.train_dataset, batch_sampler=batches, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)
        loader = self.accelerator.prepare(loader)
        shard = getattr(loader, "batch_sampler", None)
        if shard is not batches and getattr(shard, "batch_sampler", None) is batches:
            # accelerate wrapped our rank-aware sampler in a BatchSamplerShard that would deal
            # whole batches round-robin: make it a pass-through, and forward set_epoch.
            shard.num_processes, shard.process_index = 1, 0
            shard.set_epoch = batches.set_epoch
        return loader

    # ---- optimisation -----------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """Trainer's optimizer class and kwargs (args.optim, lr, betas, ...) over side groups."""
        if self.optimizer is None:
            groups = side_param_groups(model if model is not None else self.model,
                                       self.args.weight_decay, self.side_of)
            optimizer_cls, options = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls(groups, **options)
        return self.optimizer

    def training_step(self, model, inputs, *args, **kwargs):
        """Trainer's step; keeps the micro-batch and its loss for BalanceCallback's probes."""
        self.last_inputs = inputs
        loss = super().training_step(model, inputs, *args, **kwargs)
        self.last_loss = loss.detach()
        return loss

    # ---- checkpoints ------------------------------------------------------------------------
    def _unwrapped(self, model=None):
        """The model without DDP / DeepSpeed / torch.compile wrappers."""
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        return getattr(model, "_orig_mod", model)

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        """Adapter-only save (every checkpoint and save_model): save_adapters, peft/ for PEFT."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self._unwrapped()
        save_adapters(model, output_dir)
        if hasattr(model, "peft_config"):
            model.save_pretrained(os.path.join(output_dir, PEFT_FOLDER))
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)
        self._warn_uncovered(model)

    def _warn_uncovered(self, model):
        """Warn once when trainable parameters are in neither adapter file (resume loses them)."""
        if self._warned_uncovered:
            return
        self._warned_uncovered = True
        covered = {t.data_ptr() for t in adapter_state_dict(model).values()}
        peft = hasattr(model, "peft_config")
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.data_ptr() not in covered
                   and not (peft and "lora_" in n)]
        if missing:
            warnings.warn(f"{len(missing)} trainable parameters are not in adapter checkpoints "
                          f"(e.g. {missing[:3]}); resuming will not restore them", stacklevel=3)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume: load_adapters (+ peft/ and BalanceCallback state); other formats: Trainer's."""
        if not os.path.isfile(os.path.join(resume_from_checkpoint, WEIGHTS_NAME)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self._unwrapped(model)
        load_adapters(model, resume_from_checkpoint, patch=False)
        peft_weights = os.path.join(resume_from_checkpoint, PEFT_FOLDER, WEIGHTS_NAME)
        if hasattr(model, "peft_config") and os.path.isfile(peft_weights):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file
            set_peft_model_state_dict(model, load_file(peft_weights))
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, BalanceCallback):
                callback.load_checkpoint(resume_from_checkpoint)


class BalanceCallback(TrainerCallback):
    """CoMMIT for Trainer: a κ probe every `probe_every` optimizer steps (BalanceMonitor,
    probe_mode "eval": three no-grad forwards of the step's last micro-batch), per-side LR
    multipliers m = balance_multipliers(κ̂, alpha, clip) applied by Trainer's own LambdaLR
    schedule (lr_side(t) = lr · schedule(t) · m_side; a κ̂ update acts from the next step on),
    one JSONL row per probe in output_dir/`log_name` and output_dir/balance.png at the end
    (world process zero). Needs MlanTrainer (it reads the micro-batch and the side groups).

    probe_on: "any", or "image" to move a due probe to the next image-text step. Under several
    processes the two KLs are averaged over ranks, so κ̂ and the LRs agree everywhere.
    `lr_history`: per step {"step", "lr_feature", "lr_language", "m_feat", "m_lang"}.
    """

    def __init__(self, probe_every: int = 10, alpha: float = 0.5, clip: Sequence[float] = (0.1, 10.0),
                 beta: float = 0.9, eps: float = 1e-12, probe_on: str = "any",
                 log_name: Optional[str] = "balance.jsonl", plot: bool = True):
        if not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"probe_every must be a positive int, got {probe_every!r}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        if probe_on not in ("any", "image"):
            raise ValueError(f"probe_on must be 'any' or 'image', got {probe_on!r}")
        self.probe_every, self.alpha, self.clip, self.beta, self.eps = probe_every, alpha, tuple(clip), beta, eps
        self.probe_on, self.log_name, self.plot = probe_on, log_name, plot
        self.trainer, self.monitor, self.lr_history = None, None, []
        self._kappa_hat, self._probe_due, self._probing = None, False, False

    def bind(self, trainer: MlanTrainer):
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

    def load_checkpoint(self, directory: str):
        """Restore κ̂ and a pending probe from a checkpoint folder (no file: nothing to do)."""
        path = os.path.join(directory, BALANCE_STATE_NAME)
        if os.path.isfile(path):
            with open(path) as handle:
                saved = json.load(handle)
            self._kappa_hat, self._probe_due = saved["kappa_hat"], saved["probe_due"]
            if self.monitor is not None:
                self.monitor.kappa_hat = self._kappa_hat

    def on_train_end(self, args, state, control, **kwargs):
        if not (self.plot and state.is_world_process_zero and self.monitor and self.monitor.records):
            return
        try:
            from ..plot import plot_balance
            plot_balance(self.monitor.records, os.path.join(args.output_dir, "balance.png"))
        except ImportError as error:                  # matplotlib is the `bench` extra
            warnings.warn(f"balance plot skipped: {error}", stacklevel=2)
