"""End-to-end train step of a LLaMA decoder stack: fused MM-Adapters vs LaVIN's eager adapters.

    python -m mlan_bench.e2e_step --device cuda --preset paper --iters 10 --json out.json

Model: a HuggingFace `LlamaModel` with random weights from a LlamaConfig written here (no
downloads), fed `inputs_embeds` (its token embedding is cut to 128 rows, unused). One step =
forward on x [B, S, D] (no grad) -> loss = mean((last_hidden_state - target)²) in fp32, target a
fixed random [B, S, D] (mean(last_hidden_state²) alone is ~1 whatever the weights, since the
stack ends in an RMSNorm, and its gradients vanish) -> backward -> AdamW step on the trainable
parameters; gradients are zeroed with set_to_none.

Variants (same seed, same weights, same inputs):
    fused           patch_llama(placement="attn"), the op's default backend (dispatcher's
                    choice: triton/cuda on GPU, the compiled cpu backend on CPU), base frozen.
    eager_adapters  the same patch and parameters, but each adapter runs LaVIN's
                    `RepAdapter_Router` forward in plain eager torch (Conv1d k=1 down ->
                    nn.Dropout -> one grouped Conv1d per expert, router softmax / t on token 0,
                    weighted sum, scale, residual) with autograd's backward. Not the package's
                    "reference" backend: that one has an explicit hand-written backward and a
                    Philox dropout mask, which is not what LaVIN users run.
    no_adapters     the unpatched stack, only the RMSNorm weights trainable: the cheapest
                    trainable set that still runs backward through every layer (the ceiling).

MLAN batches are single-modality: every sample's position 0 holds the same modality-token
embedding, so (causal attention: position 0 sees only itself) all routing weights are equal in
every layer, and the fused adapters are told so (`set_single_modality(model, True)`: the
combined-U fast path, which None never takes on GPU). LaVIN's mask that hides position 0 from
later tokens is not applied (plain causal SDPA / flash attention keeps the base stack at its
fastest; adapter cost is unaffected).

Presets: "paper" = LLaMA-7B layer shape (D 4096, MLP 11008, 32 heads), 4 layers (the top of
the 2-4 range of docs/performance.md: more adapter sites per step, ~1.6 GB of bf16
weights), batch 4 x seq 2048, bf16 on GPU; "small" = CPU-sized fp32 (D 512, 2 layers, batch 4
x seq 256); "tiny" = tests. Timing (testing.measure): median and IQR over `iters` steps after
`warmup`; CUDA events around each step (one sync before and after the loop), perf_counter on CPU.
Memory: `peak_memory_bytes` is torch.cuda.max_memory_allocated over the timed steps (weights,
optimizer state and activations; None on CPU). The CPU proxies, on every device: `saved_bytes`
(bytes autograd keeps for backward in one forward, parameters and inputs excluded) and
`step_memory_bytes` (extra bytes at the peak of one step: CUDA allocator, or the growth of the
process's peak resident set on Linux CPU; see timing.peak_memory).
"""
import argparse
import dataclasses
import gc
import importlib.util
import json
import time

import torch
from torch import nn
from torch.nn import functional as F

from mlan_kernels import dispatch
from mlan_kernels.config import AdapterConfig
from mlan_kernels.integrations import patching
from mlan_kernels.integrations.llama import patch_llama
from mlan_kernels.functional import routing_weights
from mlan_kernels.testing import measure
from . import timing

VARIANTS = ("fused", "eager_adapters", "no_adapters")
PRESETS = {
    "tiny": dict(dim=128, intermediate=256, heads=4, layers=2, batch=2, seq_len=64),
    "small": dict(dim=512, intermediate=1376, heads=8, layers=2, batch=4, seq_len=256),
    "paper": dict(dim=4096, intermediate=11008, heads=32, layers=4, batch=4, seq_len=2048),
}
# LaVIN-7B adapter settings (docs/lavin_integration.md); dropout_p is the step's own argument.
ADAPTER = AdapterConfig(rank=8, experts=2, groups=2, scale=1.0, temperature=10.0, placement="attn")


class EagerLaVINAdapter(nn.Module):
    """LaVIN's `RepAdapter_Router.forward` in eager torch, on an MMAdapter's parameters.

    x [B, L, D] -> x + s Σ_e w[b, e] · ConvUp_e(dropout(ConvDown(x))), w = softmax(W_R x[:, 0] / t).
    The MMAdapter stays a child, so the trainable parameter set is the fused variant's.
    """

    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter
        self.dropout = nn.Dropout(adapter.dropout_p)

    def forward(self, x, weights=None, backend=None, single_modality=None):
        a = self.adapter
        if weights is None:     # LaVIN: softmax(expert_weights(x[:, 0]) / t), then cast down
            weights = routing_weights(x[:, 0], a.router.weight, a.router.bias, a.temperature)
        weights = (a.scale * weights).to(x.dtype)                                    # [B, E]
        channels_first = x.transpose(1, 2)                                           # [B, D, L]
        hidden = self.dropout(F.conv1d(channels_first, a.down.weight[..., None], a.down.bias))
        out = channels_first                                                         # [B, D, L]
        for expert in range(a.experts):   # LaVIN's conv_B, conv_D: Conv1d(r, D, 1, groups=g)
            up = F.conv1d(hidden, a.up.weight[expert][..., None], a.up.bias[expert], groups=a.groups)
            out = out + up * weights[:, expert, None, None]
        return out.transpose(1, 2).contiguous()


def _attention_implementation(device, dtype):
    """flash-attn 2 when installed and usable (CUDA, 16-bit), else PyTorch SDPA."""
    flash = (torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16)
             and importlib.util.find_spec("flash_attn") is not None)
    return "flash_attention_2" if flash else "sdpa"


def build_model(preset, device, dtype, seed=0):
    """LlamaModel with random weights of `preset` (a name or a PRESETS-like dict), train mode."""
    from transformers import LlamaConfig, LlamaModel
    shape = PRESETS[preset] if isinstance(preset, str) else preset
    config = LlamaConfig(hidden_size=shape["dim"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["heads"], vocab_size=128,
                         max_position_embeddings=max(2048, shape["seq_len"]), use_cache=False,
                         attn_implementation=_attention_implementation(device, dtype))
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaModel(config)
    return model.to(dtype).train()


def make_inputs(preset, device, dtype, seed=0):
    """(inputs_embeds [B, S, D] in dtype, target [B, S, D] fp32), no grad; position 0 of the
    inputs is one shared modality token (a single-modality batch)."""
    shape = PRESETS[preset] if isinstance(preset, str) else preset
    generator = torch.Generator().manual_seed(seed + 1)
    x, target = torch.randn(2, shape["batch"], shape["seq_len"], shape["dim"], generator=generator)
    x[:, 0] = x[0, 0]
    return x.to(device=device, dtype=dtype), target.to(device)


def prepare_variant(model, variant, dropout_p=0.1):
    """Patch `model` in place for `variant`; returns a short name of what runs the adapters."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "no_adapters":
        model.requires_grad_(False)
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.requires_grad_(True)
        return "none (RMSNorm weights train)"
    patch_llama(model, dataclasses.replace(ADAPTER, dropout_p=dropout_p), freeze_base=True)
    norms = patching.adapted_norms(model)
    if variant == "eager_adapters":
        for adapted in norms:
            adapted.adapter = EagerLaVINAdapter(adapted.adapter)
        model.train()   # the new nn.Dropout modules follow the model's mode
        return "LaVIN eager (Conv1d + autograd)"
    set_single_modality = getattr(patching, "set_single_modality", None)
    if set_single_modality is not None:
        set_single_modality(model, True)
    parameter = norms[0].adapter.down.weight
    backend = dispatch.select_backend(parameter.device, parameter.dtype)
    return f"mlan {backend}" + ("" if set_single_modality else " (modality detected per call)")


class TrainStep:
    """One variant, ready to step: model, AdamW over its trainable parameters, fixed inputs."""

    def __init__(self, variant, preset, device, dtype, seed=0, dropout_p=0.1, lr=1e-3):
        self.variant, self.device = variant, torch.device(device)
        self.model = build_model(preset, device, dtype, seed)
        self.adapter_impl = prepare_variant(self.model, variant, dropout_p)
        self.inputs, self.target = make_inputs(preset, device, dtype, seed)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=lr)

    def loss(self):
        hidden = self.model(inputs_embeds=self.inputs).last_hidden_state           # [B, S, D]
        return F.mse_loss(hidden.float(), self.target)

    def __call__(self):
        """zero grads -> forward -> loss -> backward -> AdamW step; returns the loss tensor."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def measure_variant(variant, preset, device, dtype, iters, warmup, seed=0):
    """One result row (without speedup_vs_eager) for `variant`."""
    device = torch.device(device)
    step = TrainStep(variant, preset, device, dtype, seed)
    saved = timing.saved_tensor_bytes(step.loss, exclude=[*step.model.parameters(), step.inputs])
    step()                                      # allocates the AdamW state
    step_memory = timing.peak_memory(step, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)      # the peak of the timed steps only
    times = measure(step, device, warmup=warmup, iters=iters)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    shape = PRESETS[preset] if isinstance(preset, str) else preset
    tokens = shape["batch"] * shape["seq_len"]
    median = times["median_ms"] / 1e3
    row = dict(op="e2e_step", variant=variant, device=str(device),
               dtype=str(dtype).replace("torch.", ""), layers=shape["layers"], dim=shape["dim"],
               tokens=tokens, batch=shape["batch"], seq_len=shape["seq_len"], median_s=median,
               iqr_s=times["iqr_ms"] / 1e3, tokens_per_s=tokens / median,
               peak_memory_bytes=peak, step_memory_bytes=step_memory, saved_bytes=saved,
               adapter_impl=step.adapter_impl, preset=preset,
               trainable_params=sum(p.numel() for p in step.trainable))
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_e2e_step(device: str, dtype: torch.dtype, preset: str = "small", iters: int = 10,
                 warmup: int = 2) -> list[dict]:
    """Rows for the three VARIANTS of the end-to-end train step (see the module docstring).

    preset: "tiny" | "small" | "paper". Each row: op, variant, device, dtype, layers, dim,
    tokens (per step = batch * seq_len), batch, seq_len, median_s, iqr_s, tokens_per_s,
    peak_memory_bytes (CUDA max_memory_allocated; None on CPU), speedup_vs_eager (tokens/s
    over eager_adapters'), plus saved_bytes, step_memory_bytes, adapter_impl,
    trainable_params and preset.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    rows = [measure_variant(variant, preset, device, dtype, iters, warmup) for variant in VARIANTS]
    eager = next(row["tokens_per_s"] for row in rows if row["variant"] == "eager_adapters")
    for row in rows:
        row["speedup_vs_eager"] = row["tokens_per_s"] / eager
    return rows


def _mebibytes(value):
    return "-" if value is None else f"{value / 2**20:.1f}"


def format_table(rows):
    """The rows as a fixed-width text table (memory in MiB; "-" where not measured)."""
    lines = [f"{'variant':<16}{'ms/step':>10}{'IQR ms':>9}{'tok/s':>10}{'x eager':>9}"
             f"{'peak MiB':>10}{'step MiB':>10}{'saved MiB':>11}  adapters"]
    for row in rows:
        lines.append(f"{row['variant']:<16}{row['median_s'] * 1e3:>10.1f}{row['iqr_s'] * 1e3:>9.1f}"
                     f"{row['tokens_per_s']:>10.0f}{row['speedup_vs_eager']:>9.2f}"
                     f"{_mebibytes(row['peak_memory_bytes']):>10}"
                     f"{_mebibytes(row['step_memory_bytes']):>10}"
                     f"{_mebibytes(row['saved_bytes']):>11}  {row['adapter_impl']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    begin = time.perf_counter()
    rows = run_e2e_step(args.device, getattr(torch, dtype_name), args.preset, args.iters, args.warmup)
    first = rows[0]
    print(f"e2e train step, preset {args.preset}: {first['layers']} layers, D={first['dim']}, "
          f"batch {first['batch']} x seq {first['seq_len']}, {dtype_name} on {first['device']}, "
          f"{args.iters} iters after {args.warmup} warmup, {torch.get_num_threads()} CPU threads")
    print(format_table(rows))
    print(f"wall time {time.perf_counter() - begin:.1f} s")
    if args.json:
        environment = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
        with open(args.json, "w") as handle:
            json.dump({"environment": environment, "rows": rows}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
