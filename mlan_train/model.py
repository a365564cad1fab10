"""The model of the mixed-modality training program: a LaVIN-patched LLaMA + CLIP.

build_model(config, vocab_size) -> LavinModel, either tiny random-init models built in code
(tiny.py) or local HuggingFace checkpoints (--llama / --clip, never downloaded), patched
with MM-Adapters at LaVIN's sites. param_groups() splits the trainable parameters into the
CoMMIT feature / language sides (× weight decay or not) for AdamW and the BalanceScheduler.
"""
import torch
from torch import nn

from mlan_kernels.integrations import set_backend, set_single_modality
from mlan_kernels.integrations.lavin import LavinModel, build_lavin
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama
from mlan_kernels.training.balance import FEATURE, LANGUAGE, balance_groups
from mlan_kernels.training.scheduler import GROUP_KEY
from .config import max_length

FEATURE_PREFIXES = ("clip.", "neck.", "modality_embedding.")


def trains_base(config) -> bool:
    """--train-base unless given: True for the tiny random models, False with --llama."""
    return config.train_base if config.train_base is not None else config.llama is None


def _load_llama(path):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)


def _load_clip(path):
    from transformers import CLIPVisionModel
    return CLIPVisionModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)


def build_model(config, vocab_size: int) -> LavinModel:
    """The patched LavinModel on CPU, fp32, train mode (parameters of a frozen base keep
    requires_grad=False). vocab_size: the tokenizer's; a loaded LLaMA must cover it."""
    image_tokens = config.clip_layers // config.clip_every
    if config.llama:
        llama = _load_llama(config.llama)
        if llama.config.vocab_size < vocab_size:
            raise ValueError(f"--llama {config.llama}: vocab_size {llama.config.vocab_size} < the "
                             f"tokenizer's {vocab_size} (pass --tokenizer of that checkpoint)")
    else:
        llama = tiny_llama(seed=config.seed, hidden_size=config.dim, layers=config.layers,
                           heads=config.heads, intermediate_size=4 * config.dim,
                           vocab_size=vocab_size,
                           max_position_embeddings=max_length(config) + 1 + image_tokens)
    if config.clip:
        clip = _load_clip(config.clip)
    else:
        clip = tiny_clip(seed=config.seed + 1, hidden_size=config.clip_dim,
                         layers=config.clip_layers, heads=4, intermediate_size=2 * config.clip_dim,
                         image_size=config.image_size, patch_size=config.patch_size)
    torch.manual_seed(config.seed + 2)                       # adapters, neck, modality token
    model = build_lavin(llama, clip, config.adapter, freeze_base=not trains_base(config),
                        clip_every=config.clip_every)
    if trains_base(config):
        model.requires_grad_(True)
    # MLAN batches hold one modality, so every LLaMA adapter may use the single-U fast path
    # without checking. CLIP adapters route per image: they keep None (per sample; on the Triton
    # path the general kernels, no device sync).
    set_single_modality(model.llama, True)
    set_backend(model, config.backend)
    return model.train()


def model_record(model: LavinModel, config) -> dict:
    """What run.json records of the models actually trained: their sizes (read from the
    loaded configs, so --llama/--clip checkpoints are described, not the tiny defaults) and
    where they came from."""
    llama, clip = model.llama.config, model.clip.config
    return {"llama": config.llama or "tiny LLaMA built in code",
            "clip": config.clip or "tiny CLIP built in code",
            "dim": llama.hidden_size, "layers": llama.num_hidden_layers,
            "heads": llama.num_attention_heads, "vocab_size": llama.vocab_size,
            "clip_dim": clip.hidden_size, "clip_layers": clip.num_hidden_layers,
            "image_size": clip.image_size, "patch_size": clip.patch_size,
            "clip_every": model.clip_every, "image_tokens": model.image_token_count}


def side_of(name: str) -> str:
    """CoMMIT side of a LavinModel parameter name: CLIP, neck, modality token -> feature."""
    return FEATURE if name.startswith(FEATURE_PREFIXES) else LANGUAGE


def param_groups(model: nn.Module, weight_decay: float, train_base: bool) -> list:
    """AdamW param groups tagged with their side (GROUP_KEY): per side, ≥2-D weights with
    weight decay and 1-D ones (biases, norms, gates) without. With a frozen base the sides
    come from balance_groups (CLIP adapters + neck + modality token vs LLaMA adapters)."""
    assign = (lambda name, _: side_of(name)) if train_base else None
    feature, language = balance_groups(model, assign)
    groups = []
    for side, params in ((FEATURE, feature), (LANGUAGE, language)):
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "weight_decay": weight_decay if decay else 0.0,
                               GROUP_KEY: side})
    return groups


def side_parameters(optimizer) -> dict:
    """{"feature": [params], "language": [params]} from param_groups' tags."""
    sides = {FEATURE: [], LANGUAGE: []}
    for group in optimizer.param_groups:
        sides[group[GROUP_KEY]].extend(group["params"])
    return sides
