"""An independent, eager rendering of LaVIN's own modules and checkpoint format, written from
LaVIN's public code (github.com/luogen1996/LaVIN, commit dd0a1bf), for tests to compare with.
Nothing here imports mlan_kernels' adapter code: names, shapes and math come from LaVIN.

    lavin/mm_adapter.py  10-51   RepAdapter_Router: conv_A (Conv1d D->r), conv_B / conv_D
                                 (Conv1d r->D, groups=g), expert_weights (Linear D->2); routing
                                 weights softmax(expert_weights(x[:, 0]) / t).half() (line 46)
    lavin/model.py      198-220  AdapterMLP (the neck): conv_B(silu(conv_A(x)))
                        254-255  adapter_proj = AdapterMLP(1024, hidden_proj, dim),
                                 adapter_modality_embedding = Embedding(2, dim)
    lavin/mm_adapter.py 134-190  where adapters live: layers.{i}.adapter_attn (+ adapter_mlp for
                                 "block"), backbone.visual.transformer.resblocks.{i}.adapter_attn
    util/misc.py        296-314  save_model: {"model": {n: p.data for n, p in
                                 model.named_parameters() if "adapter" in n}, "optimizer",
                                 "epoch", "scaler", "args"} with model the DDP wrapper
    train.py            220      DistributedDataParallel -> names start with "module."
"""
import argparse

import torch
from torch import nn
from torch.nn import functional as F


class RepAdapterRouter(nn.Module):
    """lavin/mm_adapter.py 10-51, with random (non-zero) up-projections and a strong router."""

    def __init__(self, dim, rank, groups, temperature, scale=1.0, generator=None):
        super().__init__()
        self.conv_A = nn.Conv1d(dim, rank, 1, groups=1, bias=True)
        self.conv_B = nn.Conv1d(rank, dim, 1, groups=groups, bias=True)
        self.conv_D = nn.Conv1d(rank, dim, 1, groups=groups, bias=True)
        self.expert_weights = nn.Linear(dim, 2)
        self.t, self.scale = temperature, scale
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            self.expert_weights.weight.mul_(10.0)

    def routing_weights(self, x):
        """x: [batch, length, D] -> [batch, 2]: LaVIN line 46, including the `.half()`."""
        return torch.softmax(self.expert_weights(x[:, 0]) / self.t, -1).half()

    def forward(self, x, weights=None):
        """Lines 43-51 (eval mode: no dropout); autocast is CUDA-only, a no-op on CPU."""
        if weights is None:
            weights = self.routing_weights(x)
        x = x.transpose(1, 2)
        hidden = self.conv_A(x)
        x = (self.conv_B(hidden) * self.scale * weights[:, 0, None, None]
             + self.conv_D(hidden) * self.scale * weights[:, 1, None, None] + x)
        return x.transpose(1, 2).contiguous()


class AdapterMLP(nn.Module):
    """lavin/model.py 198-220: the visual neck."""

    def __init__(self, in_features, hidden, out_features, generator=None):
        super().__init__()
        self.conv_A = nn.Linear(in_features, hidden)
        self.conv_B = nn.Linear(hidden, out_features)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def forward(self, x):
        return self.conv_B(F.silu(self.conv_A(x)))


class Holder(nn.Module):
    """A LaVIN block as far as its trainable names go: .adapter_attn (+ .adapter_mlp)."""

    def __init__(self, make, block):
        super().__init__()
        self.adapter_attn = make()
        if block:
            self.adapter_mlp = make()


class LavinTrainables(nn.Module):
    """The part of LaVIN's `Transformer` whose parameter names contain "adapter", under LaVIN's
    module paths. clip_path: "visual" (LaVIN) or "" (the backbone.transformer.* form)."""

    def __init__(self, llama_dim, llama_layers, clip_dim, clip_layers, rank=8, groups=2,
                 neck_hidden=16, temperature=10.0, placement="attn", clip_placement="attn",
                 clip_path="visual", seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)

        def router(dim):
            return RepAdapterRouter(dim, rank, groups, temperature, generator=generator)
        self.layers = nn.ModuleList(Holder(lambda: router(llama_dim), placement == "block")
                                    for _ in range(llama_layers))
        blocks = nn.Module()
        blocks.resblocks = nn.ModuleList(Holder(lambda: router(clip_dim), clip_placement == "block")
                                         for _ in range(clip_layers))
        self.backbone = nn.Module()
        if clip_path:
            setattr(self.backbone, clip_path, nn.Module())
            getattr(self.backbone, clip_path).transformer = blocks
        else:
            self.backbone.transformer = blocks
        self.adapter_proj = AdapterMLP(clip_dim, neck_hidden, llama_dim, generator=generator)
        self.adapter_modality_embedding = nn.Embedding(2, llama_dim)
        with torch.no_grad():
            self.adapter_modality_embedding.weight.copy_(
                torch.randn(2, llama_dim, generator=generator))


class DDP(nn.Module):
    """What DistributedDataParallel does to parameter names: prefix "module."."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def lavin_args(**overrides):
    """LaVIN train.py's arguments for the shipped 7B script (scripts/finetuning_sqa_7b.sh)."""
    values = dict(batch_size=4, epochs=20, bits="16bit", accum_iter=4, llama_model_path="../data/weights/",
                  llm_model="7B", use_vicuna=False, cpu_load=False, adapter_type="attn",
                  visual_adapter_type="router", adapter_dim=8, hidden_proj=128, temperature=10.0,
                  n_prompt=6, adapter_scale=1.0, drop_path=0.0, max_seq_len=512,
                  weight_decay=0.02, lr=None, clip_grad=None, blr=9e-3, min_lr=0.0,
                  gradient_checkpointing=False, warmup_epochs=2.0, data_path="../data/alpaca_data.json",
                  output_dir="./LaVIN-7B/", log_dir="./output_dir", device="cuda", seed=0,
                  resume="", start_epoch=0, num_workers=10, pin_mem=True, world_size=2,
                  local_rank=-1, dist_on_itp=False, dist_url="env://", prompt_format="QCM-ALE",
                  options=["A", "B", "C", "D", "E"], caption_file="../data/captions.json",
                  data_root="../data", use_caption=False, do_pretrain=False, rank=0, gpu=0,
                  distributed=True, dist_backend="nccl")
    values.update(overrides)
    return argparse.Namespace(**values)


def save_lavin_checkpoint(path, trainables, ddp=True, args=None, epoch=19):
    """util/misc.py save_model, as run under torchrun (ddp) or in a single process."""
    model = DDP(trainables) if ddp else trainables
    optimizer = torch.optim.AdamW(trainables.parameters(), lr=0.0, betas=(0.9, 0.95))
    for parameter in trainables.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()                      # lr 0: weights unchanged, optimizer state holds tensors
    trainables.zero_grad(set_to_none=True)
    trainable = {n: p.data for n, p in model.named_parameters() if "adapter" in n}
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
              "growth_interval": 2000, "_growth_tracker": 17}
    torch.save({"model": trainable, "optimizer": optimizer.state_dict(), "epoch": epoch,
                "scaler": scaler, "args": args if args is not None else lavin_args()}, path)
    return trainable


def _sequence_first(adapter):
    """LaVIN's CLIP runs [L, N, C] (clip/model.py line 237 permutes NLD -> LND), and its
    RepAdapter_Router takes dim 0 as the batch: x[:, 0] is image 0's token at each position.
    HF's CLIP is [N, L, C], so the hook hands LaVIN's module the tensor LaVIN would see."""
    return lambda module, args, out: adapter(out.transpose(0, 1)).transpose(0, 1)


def _attach(llama, clip, trainables):
    """Forward hooks that put LaVIN's adapters where set_MMAdapter / set_Clip_Adapter put them
    (lavin/mm_adapter.py 89-131): after the norm in front of attention (and of the MLP for
    "block"). Returns the hook handles."""
    hooks = []
    llama_layers = [m for m in llama.modules() if hasattr(m, "input_layernorm")]
    clip_layers = [m for m in clip.modules() if hasattr(m, "layer_norm1") and hasattr(m, "mlp")]
    for layer, holder in zip(llama_layers, trainables.layers, strict=True):
        hooks.append(layer.input_layernorm.register_forward_hook(
            lambda module, args, out, adapter=holder.adapter_attn: adapter(out)))
        if hasattr(holder, "adapter_mlp"):
            hooks.append(layer.post_attention_layernorm.register_forward_hook(
                lambda module, args, out, adapter=holder.adapter_mlp: adapter(out)))
    visual = getattr(trainables.backbone, "visual", trainables.backbone)
    for layer, holder in zip(clip_layers, visual.transformer.resblocks, strict=True):
        hooks.append(layer.layer_norm1.register_forward_hook(_sequence_first(holder.adapter_attn)))
        if hasattr(holder, "adapter_mlp"):
            hooks.append(layer.layer_norm2.register_forward_hook(_sequence_first(holder.adapter_mlp)))
    return hooks


def lavin_forward(llama, clip, trainables, examples, labels, images, indicators, prefix_img,
                  prefix_nonimg, clip_every=4):
    """LaVIN's training forward (lavin/model.py 284-333) on unpatched HF base modules.

    examples, labels: [B, T] int64 padded with 0 (LaVIN's pad and ignore index); images
    [B, 3, H, W] with zeros for text-only samples (util/datasets.py 150-152); indicators [B]
    0/1; prefix_img / prefix_nonimg: 1-D ids of "Image: " / "Image: N/A" without BOS
    (engine.py 33-34). Returns (logits [B, T, V] fp32, loss). LaVIN's `.half()` on the image
    features (287) and modality embedding (308) cast to its fp16 LLaMA's dtype; here the
    LLaMA's dtype is used (fp32 in the tests).
    """
    hooks = _attach(llama, clip, trainables)
    try:
        dtype = llama.get_input_embeddings().weight.dtype
        # clip/model.py 237-251: CLS token after every 4th block, before ln_post
        hidden = clip(pixel_values=images, output_hidden_states=True).hidden_states
        features = torch.stack([hidden[i][:, 0] for i in range(clip_every, len(hidden), clip_every)], 1)
        image_embeds = trainables.adapter_proj(features).to(dtype)                    # 287, 295
        modality = trainables.adapter_modality_embedding(indicators[:, None]).to(dtype)  # 292
        seqlen = examples.shape[1]
        embed = llama.get_input_embeddings()
        tokens, p_img, p_non = embed(examples), embed(prefix_img), embed(prefix_nonimg)
        rows, label_rows = [], []
        for i in range(examples.shape[0]):                                  # 259-282
            inserted = [p_img, image_embeds[i]] if indicators[i] > 0 else [p_non]
            count = sum(part.shape[0] for part in inserted)
            rows.append(torch.cat([tokens[i, :1], *inserted, tokens[i, 1:]])[:seqlen])
            label_rows.append(torch.cat([labels[i, :1], labels.new_zeros(count), labels[i, 1:]])[:seqlen])
        h = torch.cat([modality, torch.stack(rows)], 1)[:, :seqlen]        # 308
        targets = torch.cat([labels.new_zeros(len(rows), 1), torch.stack(label_rows)], 1)[:, :seqlen]
        mask = torch.triu(torch.full((1, 1, seqlen, seqlen), float("-inf")), diagonal=1)  # 316-317
        mask[:, :, 1:, 0] = float("-inf")                                    # 320
        mask = mask.to(dtype).expand(len(rows), 1, seqlen, seqlen)
        logits = llama(inputs_embeds=h, attention_mask=mask, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               targets[:, 1:].flatten(), ignore_index=0)     # 234, 328-332
        return logits.float(), loss
    finally:
        for hook in hooks:
            hook.remove()
