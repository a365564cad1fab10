"""FSDP2 (torch.distributed.fsdp.fully_shard) around a LaVIN-patched LLaMA + CLIP.

    torchrun --standalone --nproc_per_node=2 python/example_fsdp2.py [--steps 8]

Shards every LLaMA decoder layer, every CLIP encoder layer and the root (neck, modality
token, embeddings), then trains the adapters with AdamW on modality-grouped batches of the
synthetic task (generated into a temporary directory per rank). Runs on CPU with gloo and on GPUs with
nccl. Prints the rank-mean loss per step; exits 1 unless the loss went down.

mlan-train uses DDP, not this: its per-side gradient clipping (scale_grads_), κ probes and
safetensors checkpoints expect full (non-DTensor) parameters. With FSDP2, clip with
torch.nn.utils.clip_grad_norm_ (DTensor-aware) and save with torch.distributed.checkpoint.
"""
import argparse
import gc
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from mlan_kernels.help_format import DefaultsHelpFormatter


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per rank and step")
    args = parser.parse_args(argv)

    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from mlan_kernels.data import (InstructionDataset, MixtureSampler, ModalityLengthBatchSampler,
                                   WordTokenizer, collate, load_records, make_synthetic,
                                   split_by_modality)
    from mlan_kernels.integrations.lavin import build_lavin
    from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama

    cuda = torch.cuda.is_available()
    if cuda:                  # before anything touches CUDA: FSDP2 shards onto current_device()
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    with tempfile.TemporaryDirectory() as data:            # every rank its own (deterministic) copy
        make_synthetic(data, train_size=256, eval_size=8)
        tokenizer = WordTokenizer.load(os.path.join(data, "tokenizer.json"))
        dataset = InstructionDataset(load_records(os.path.join(data, "train.jsonl"))[0], tokenizer)
        samples = [dataset[i] for i in range(len(dataset))]           # images read before cleanup
    batches = ModalityLengthBatchSampler(MixtureSampler(*split_by_modality(dataset), 0.5),
                                         dataset.lengths, dataset.has_image, args.batch_size,
                                         world_size=world_size, rank=rank)
    torch.manual_seed(0)                                   # the same initial weights on all ranks
    model = build_lavin(tiny_llama(hidden_size=64, vocab_size=tokenizer.vocab_size),
                        tiny_clip(hidden_size=64, layers=4, patch_size=7), neck_hidden=32).to(device)
    for module in list(model.modules()):
        if isinstance(module, (LlamaDecoderLayer, CLIPEncoderLayer)):
            fully_shard(module)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, iterator = [], iter(batches)
    for step in range(args.steps):
        batch = collate([samples[i] for i in next(iterator)], pad_id=tokenizer.pad_id)
        inputs = {key: None if batch[key] is None else batch[key].to(device)
                  for key in ("input_ids", "attention_mask", "labels", "pixel_values", "has_image")}
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world_size)
        if rank == 0:
            modality = "image" if batch["has_image"].any() else "text"
            print(f"step {step} ({modality}) loss {losses[-1]:.4f}", flush=True)
    del model, optimizer                # they hold the process group: release it first, then
    gc.collect()                        # tear down with every rank past its last collective
    dist.barrier()
    dist.destroy_process_group()
    half = len(losses) // 2
    improved = sum(losses[half:]) / (len(losses) - half) < sum(losses[:half]) / half
    if rank == 0:
        print("FSDP2 loss went down" if improved else "FSDP2 loss did NOT go down")
    return 0 if improved else 1


if __name__ == "__main__":
    sys.exit(main())
