"""Patch a tiny random LLaMA with MM-Adapters, train a few steps on CPU, merge, save and load.

    python python/example_patch_llama.py        # ~10 s on a laptop CPU, no downloads

The same calls work on a pretrained `LlamaForCausalLM.from_pretrained(...)`.
"""
import argparse
import tempfile

import torch

from mlan_kernels.integrations.checkpoint import load_adapters, save_adapters
from mlan_kernels.help_format import DefaultsHelpFormatter
from mlan_kernels.integrations import (merge_adapters, patch_llama, record_routing_weights,
                                       unmerge_adapters)
from mlan_kernels.integrations.tiny import tiny_llama
from mlan_kernels.integrations.summary import summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="AdamW steps on the adapters")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base model, data and dropout")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = patch_llama(tiny_llama(seed=args.seed), rank=8, experts=2, groups=2, temperature=10.0,
                        dropout_p=0.1)
    print(summary(model))
    batch = torch.randint(3, 97, (4, 16))            # stand-in for tokenized text, [B, L]

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(args.steps):
        loss = model(batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    model.eval()
    prompt = batch[:1, :8]
    print("generated:", model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 8:].tolist())

    # Merge: the routing weights of this prompt (position 0) folded into q/k/v.
    with record_routing_weights(model) as recorder:
        logits = model(prompt).logits
    merge_adapters(model, recorder.weights)
    merged = model(prompt).logits
    print(f"merged vs adapters, max |Δlogit| = {(merged - logits).abs().max().item():.2e}")
    unmerge_adapters(model)

    with tempfile.TemporaryDirectory() as directory:
        save_adapters(model, directory)             # adapter_model.safetensors + adapter_config.json
        fresh = tiny_llama(seed=args.seed)           # same base weights (seeded), no adapters
        load_adapters(fresh, directory)              # patched from the saved config, then loaded
        same = torch.equal(fresh(prompt).logits, model(prompt).logits)
        print("reloaded model gives identical logits:", same)


if __name__ == "__main__":
    main()
