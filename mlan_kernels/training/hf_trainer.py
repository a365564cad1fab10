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
  loadable by load_adapters), plus each PEFT wrapper's under peft/<module name>/; resume goes through
  Trainer's resume_from_checkpoint (optimizer, scheduler, RNG and sampler position are Trainer's).
- gradient checkpointing of a model that is not a PreTrainedModel (LavinModel): enabled
  non-reentrant on each HF sub-model (Trainer would call a method the model lacks).
BalanceCallback adds κ probes, per-side LR multipliers on Trainer's LambdaLR schedule, JSONL rows
and the balance plot. Needs `accelerate` (transformers' Trainer does): extra `mlan-kernels[hf]`.
"""
import os
import warnings
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from ..integrations.checkpoint import WEIGHTS_NAME, adapter_state_dict, load_adapters, save_adapters
from ..data.collate import collate
from ..data.dataset import split_by_modality
from ..data.sampler import MixtureSampler, ModalityLengthBatchSampler
from ..data.tokenizer import as_tokenizer
from ..integrations.hf_compat import enable_gradient_checkpointing
from .balance import FEATURE, LANGUAGE
from .hf_balance import BalanceCallback
from .scheduler import GROUP_KEY
from .stop_signals import StopSignals

FEATURE_PARTS = frozenset({"clip", "neck", "modality_embedding"})
PEFT_FOLDER = "peft"


class MlanCollator:
    """InstructionDataset samples -> LavinModel.forward kwargs (collate without "ids"):
    input_ids / attention_mask / labels [B, T], pixel_values [B_img, 3, H, W] or None,
    has_image [B]. A class, not a lambda, so DataLoader workers can pickle it.
    pad: the pad id, or a tokenizer (ours, a HuggingFace tokenizer or processor) to take it from."""

    def __init__(self, pad=0):
        self.pad_id = pad if isinstance(pad, int) and not isinstance(pad, bool) else as_tokenizer(pad).pad_id

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


def peft_models(model: torch.nn.Module) -> dict:
    """{qualified name ("" = the model itself): PeftModel} of the outermost PEFT wrappers."""
    try:
        from peft import PeftModel
    except ImportError:
        return {}
    found, inside = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, PeftModel) and id(module) not in inside:
            found[name] = module
            inside.update(id(child) for child in module.modules())
    return found


class StopOnSignalCallback(TrainerCallback):
    """SIGTERM/SIGINT during Trainer.train(): the step in progress finishes, Trainer saves a
    checkpoint (output_dir/checkpoint-N: resume_from_checkpoint continues it) and training
    stops; `stopped_by` is then the signal's number (None when training ran to its end).
    MlanTrainer adds one unless stop_on_signal=False; handlers are restored when train() ends."""

    def __init__(self):
        self.stopped_by, self._signals = None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.release()
        self.stopped_by = None
        self._signals = StopSignals(args.world_size, args.device, "MlanTrainer").__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._signals is not None and self._signals.requested():
            self.stopped_by = self._signals.received
            control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.release()

    def release(self):
        """Give SIGTERM/SIGINT back to the handlers they had before train()."""
        if self._signals is not None:
            self._signals.__exit__()
            self._signals = None


class MlanTrainer(Trainer):
    """Trainer with the MLAN sampler, per-side param groups and adapter-only checkpoints.

    train_dataset: an InstructionDataset (anything with `lengths` and `has_image` lists).
    language_share: text fraction of each epoch's mixture (None: the dataset's own share, i.e.
    all of it); samples_per_epoch: mixture size n (None: the largest that fits);
    mixture_seed: default args.seed; mega_batch_size / group_by_length: as in
    ModalityLengthBatchSampler; side_of: see side_param_groups; stop_on_signal: on SIGTERM or
    SIGINT save a checkpoint after the current step and stop (StopOnSignalCallback). Other
    arguments are Trainer's; without a data_collator, MlanCollator with the pad id of
    `processing_class` (a tokenizer or processor, saved with each checkpoint) or of the
    train_dataset's tokenizer.
    """

    def __init__(self, *args, language_share: Optional[float] = None,
                 samples_per_epoch: Optional[int] = None, mixture_seed: Optional[int] = None,
                 mega_batch_size: Optional[int] = None, group_by_length: bool = True,
                 side_of: Optional[Callable[[str], str]] = None, stop_on_signal: bool = True,
                 **kwargs):
        if kwargs.get("data_collator") is None:
            sources = (kwargs.get("processing_class"), kwargs.get("tokenizer"),
                       getattr(kwargs.get("train_dataset"), "tokenizer", None))
            source = next((item for item in sources if item is not None), None)
            kwargs["data_collator"] = MlanCollator(0 if source is None else source)
        super().__init__(*args, **kwargs)
        self.stop_on_signal = StopOnSignalCallback() if stop_on_signal else None
        if self.stop_on_signal is not None:
            self.add_callback(self.stop_on_signal)
        self.language_share, self.samples_per_epoch = language_share, samples_per_epoch
        self.mixture_seed = self.args.seed if mixture_seed is None else mixture_seed
        self.mega_batch_size, self.group_by_length, self.side_of = mega_batch_size, group_by_length, side_of
        self.last_inputs, self.last_loss, self.train_batch_sampler = None, None, None
        self._warned_uncovered = False
        self._checkpoint_parts()
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, BalanceCallback):
                callback.bind(self)

    def train(self, *args, **kwargs):
        """Trainer.train; SIGTERM/SIGINT handlers are restored however it ends."""
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.stop_on_signal is not None:
                self.stop_on_signal.release()

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
        for name, wrapper in peft_models(model).items():       # e.g. peft/llama/
            wrapper.save_pretrained(os.path.join(output_dir, PEFT_FOLDER, name))
        processor = (self.processing_class if hasattr(self, "processing_class")
                     else getattr(self, "tokenizer", None))       # transformers < 4.46: tokenizer
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(output_dir)
        self._warn_uncovered(model)

    def _warn_uncovered(self, model):
        """Warn once when trainable parameters are in neither adapter file (resume loses them)."""
        if self._warned_uncovered:
            return
        self._warned_uncovered = True
        covered = {t.data_ptr() for t in adapter_state_dict(model).values()}
        for wrapper in peft_models(model).values():
            covered.update(p.data_ptr() for n, p in wrapper.named_parameters() if p.requires_grad
                           and (".lora_" in n or "modules_to_save" in n or "prompt_encoder" in n))
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.data_ptr() not in covered]
        if missing:
            warnings.warn(f"{len(missing)} trainable parameters are not in adapter checkpoints "
                          f"(e.g. {missing[:3]}); resuming will not restore them", stacklevel=3)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume: load_adapters (+ peft/ and BalanceCallback state); other formats: Trainer's."""
        if not os.path.isfile(os.path.join(resume_from_checkpoint, WEIGHTS_NAME)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self._unwrapped(model)
        balance = [(callback, callback.read_checkpoint(resume_from_checkpoint))   # checked first
                   for callback in self.callback_handler.callbacks if isinstance(callback, BalanceCallback)]
        load_adapters(model, resume_from_checkpoint, patch=False)
        for name, wrapper in peft_models(model).items():
            weights = os.path.join(resume_from_checkpoint, PEFT_FOLDER, name, WEIGHTS_NAME)
            if os.path.isfile(weights):
                from peft import set_peft_model_state_dict
                from safetensors.torch import load_file
                set_peft_model_state_dict(wrapper, load_file(weights))
        for callback, saved in balance:
            callback.restore(saved)
