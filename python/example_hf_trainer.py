"""Train a tiny LaVIN with the HuggingFace Trainer: LLaVA-style JSON data -> InstructionDataset ->
MlanTrainer (MLAN mixture + modality/length-grouped batches, one param group per CoMMIT side)
with BalanceCallback (κ probes, per-side LR multipliers) -> adapter-only checkpoints.

    python python/example_hf_trainer.py                       # synthetic data, CPU, 60 steps
    python python/example_hf_trainer.py --data my_llava_dir   # train.jsonl/.json + tokenizer.json
    torchrun --nproc_per_node 2 python/example_hf_trainer.py  # DDP (gloo on CPU)
    python python/example_hf_trainer.py --deepspeed python/deepspeed_zero2.json   # CUDA only

Writes OUT/checkpoint-N/ (adapter_model.safetensors, adapter_config.json, Trainer state),
OUT/final/ (adapters), OUT/balance.jsonl and OUT/balance.png. Needs `accelerate`
(pip install "mlan-kernels[hf]").
"""
import argparse
import os

import torch
from transformers import TrainingArguments

from mlan_kernels.data import InstructionDataset, WordTokenizer, load_records, make_synthetic
from mlan_kernels.integrations.lavin import build_lavin
from mlan_kernels.help_format import DefaultsHelpFormatter
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama
from mlan_kernels.training.hf_trainer import BalanceCallback, MlanCollator, MlanTrainer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--data", default=None, help="folder with train.jsonl (or train.json) "
                        "and tokenizer.json (default: synthetic data generated into OUT/data)")
    parser.add_argument("--out", default="runs/hf_trainer", help="Trainer output_dir")
    parser.add_argument("--train-size", type=int, default=800, help="synthetic train samples")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (max_steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="per-device batch size")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate of both sides")
    parser.add_argument("--language-share", type=float, default=0.5,
                        help="text fraction of each epoch's MLAN mixture")
    parser.add_argument("--probe-every", type=int, default=5, help="κ probe every N steps")
    parser.add_argument("--alpha", type=float, default=0.5, help="CoMMIT LR exponent (0: off)")
    parser.add_argument("--save-steps", type=int, default=30, help="adapter checkpoint every N steps")
    parser.add_argument("--dim", type=int, default=32, help="tiny LLaMA hidden size")
    parser.add_argument("--layers", type=int, default=2, help="tiny LLaMA layers")
    parser.add_argument("--clip-layers", type=int, default=4, help="tiny CLIP blocks (multiple of 4)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON, CUDA only (default: no DeepSpeed)")
    parser.add_argument("--resume", action="store_true", help="resume from OUT's last checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="model, mixture and Trainer seed")
    return parser


def load_data(args):
    """(InstructionDataset of the train split, WordTokenizer); synthetic data when --data is unset."""
    data = args.data
    if data is None:
        data = os.path.join(args.out, "data")
        if not os.path.exists(os.path.join(data, "tokenizer.json")):
            make_synthetic(data, train_size=args.train_size, eval_size=0, seed=args.seed)
    train = next((os.path.join(data, name) for name in ("train.jsonl", "train.json")
                  if os.path.exists(os.path.join(data, name))), None)
    if train is None:
        raise SystemExit(f"--data {data}: no train.jsonl or train.json there")
    tokenizer = WordTokenizer.load(os.path.join(data, "tokenizer.json"))
    records, _ = load_records(train)
    return InstructionDataset(records, tokenizer, image_size=28, max_length=64), tokenizer


def build_model(args, vocab_size: int):
    """A tiny random LLaMA + CLIP, patched with MM-Adapters, base frozen (LaVIN's recipe)."""
    llama = tiny_llama(seed=args.seed, hidden_size=args.dim, layers=args.layers, heads=4,
                       intermediate_size=4 * args.dim, vocab_size=vocab_size,
                       max_position_embeddings=64 + 1 + args.clip_layers // 4)
    clip = tiny_clip(seed=args.seed + 1, hidden_size=32, layers=args.clip_layers, heads=4,
                     intermediate_size=64, image_size=28, patch_size=14)
    torch.manual_seed(args.seed + 2)
    return build_lavin(llama, clip, rank=4, dropout_p=0.0).train()


# transformers 5.x renamed gradient_checkpointing (a deprecated alias there) to activation_checkpointing
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in
                 TrainingArguments.__dataclass_fields__ else "gradient_checkpointing")


def training_arguments(args) -> TrainingArguments:
    return TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=max(args.steps // 10, 1), weight_decay=0.0,
        logging_steps=10, save_steps=args.save_steps, save_strategy="steps", report_to=[],
        seed=args.seed, deepspeed=args.deepspeed, use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False, disable_tqdm=True,
        **({CHECKPOINTING: True} if args.gradient_checkpointing else {}))


def make_trainer(args) -> MlanTrainer:
    dataset, tokenizer = load_data(args)
    callback = BalanceCallback(probe_every=args.probe_every, alpha=args.alpha)
    return MlanTrainer(model=build_model(args, tokenizer.vocab_size), args=training_arguments(args),
                       train_dataset=dataset, data_collator=MlanCollator(tokenizer.pad_id),
                       language_share=args.language_share, callbacks=[callback])


def end_distributed():
    """With every rank past its last collective, destroy the process group. Call it after the
    trainer is gone (its DDP model holds the group's gloo threads): a process group torn down at
    interpreter exit with a live DDP model has aborted a rank ("terminate called without an
    active exception"), mostly on a loaded machine."""
    import gc
    import torch.distributed as dist
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    trainer = make_trainer(args)
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(os.path.join(args.out, "final"))
    if trainer.is_world_process_zero():
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        print(f"steps {trainer.state.global_step}  train_loss {result.training_loss:.4f}  "
              f"logged losses {[round(loss, 3) for loss in losses]}")
        print(f"adapters: {os.path.join(args.out, 'final')}")
    del trainer
    end_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
