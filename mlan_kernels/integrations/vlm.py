"""Whole vision-language models (LLaVA, LLaVA-NeXT/OneVision, PaliGemma, Gemma 3, Idefics3/SmolVLM,
Qwen2-VL/2.5-VL): where their two sides are, the modality signal of the language side, and
PEFT-style `modules_to_save`.

A vision-language model is any HF model whose config has a `text_config` and a `vision_config`.
Its language model is the first module whose config has the text model_type (LlamaModel inside
LlavaModel on transformers 5, LlamaForCausalLM on 4.x), its vision tower the first whose config
has the vision model_type; each side is then patched as a standalone model of its family
(families.py), so adapter keys stay "llama.layers.i.*" / "clip.layers.i.*".
"""
import torch
from torch import nn

from .patching import adapted_norms
from .routing import MODALITIES, image_token_ids, install_modality_hook

MODALITY_ATTRIBUTE = "mlan_modality_embedding"
MODULES_TO_SAVE_ATTRIBUTE = "_mlan_modules_to_save"
SIDES = {"llama": "text_config", "clip": "vision_config"}


def vision_language_config(model):
    """The config of `model` (or of the first module inside it) with both a text_config and a
    vision_config, or None: `model` is then not a vision-language model."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "text_config", None) is not None and getattr(config, "vision_config", None) is not None:
            return config
    return None


def vision_language_parts(model):
    """{"llama": language model, "clip": vision tower} of a vision-language model, or None when
    `model` is not one. ValueError naming the side when a side cannot be found."""
    config = vision_language_config(model)
    if config is None:
        return None
    parts = {}
    for side, attribute in SIDES.items():
        wanted = getattr(config, attribute).model_type
        parts[side] = next((module for module in model.modules()
                            if getattr(getattr(module, "config", None), "model_type", None) == wanted), None)
        if parts[side] is None:
            raise ValueError(f"{config.model_type}: found no module with the {attribute} "
                             f"(model_type {wanted!r}) in {type(model).__name__}")
    return parts


def modality_holder(model):
    """The outermost module of `model` whose config is the vision-language config: the module
    whose forward sees input_ids and pixel_values (e.g. LlavaForConditionalGeneration)."""
    config = vision_language_config(model)
    return next(module for module in model.modules() if getattr(module, "config", None) is config)


def attach_modality_routing(model, language, record, dtype=None):
    """Give the language side's routers the modality signal (routing.py): a learned
    nn.Embedding(2, D) (LaVIN's init, N(0, 1)), registered on the language model as
    `mlan_modality_embedding`, and a pre-hook on the vision-language model that reads each
    sample's modality from its input_ids. Stored in the language side's patch `record`."""
    weight = language.get_input_embeddings().weight
    embedding = nn.Embedding(len(MODALITIES), weight.shape[1], device=weight.device,
                             dtype=dtype or weight.dtype)
    nn.init.normal_(embedding.weight)
    setattr(language, MODALITY_ATTRIBUTE, embedding)
    context = record["context"]
    context.embedding = embedding
    holder = modality_holder(model)
    record["hooks"].append(install_modality_hook(holder, context, image_token_ids(holder.config)))
    record["modality"] = {"language": language}
    record["info"]["modality_routing"] = True
    return embedding


def detach_modality_routing(record):
    """Undo attach_modality_routing (its hook goes with the record's other hooks)."""
    modality = record.pop("modality", None)
    if modality is not None:
        delattr(modality["language"], MODALITY_ATTRIBUTE)
        record["context"].embedding = None
        record["context"].modality = None


def modality_embedding(model):
    """The modality embedding of a patched vision-language model, or None."""
    for module in model.modules():
        embedding = getattr(module, MODALITY_ATTRIBUTE, None)
        if isinstance(embedding, nn.Embedding):
            return embedding
    return None


def resolve_modules_to_save(model, names):
    """{name: module} for PEFT's `modules_to_save` names: a module matches a name when its
    qualified name is the name or ends with "." + name. ValueError naming what matched nothing."""
    if isinstance(names, str) or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"modules_to_save must be a list of module names, got {names!r}")
    found = {}
    for name in names:
        matches = [(qualified, module) for qualified, module in model.named_modules()
                   if qualified == name or qualified.endswith("." + name)]
        if not matches:
            raise ValueError(f"modules_to_save: no module named {name!r} in {type(model).__name__}")
        for qualified, module in matches:
            found[qualified] = module
    return found


def set_modules_to_save(model, modules: dict):
    """Record {name: module} as trainable extras of `model` (saved in adapter checkpoints)."""
    model.__dict__.setdefault(MODULES_TO_SAVE_ATTRIBUTE, {}).update(modules)


def modules_to_save(model):
    """{name: module} of the trainable extras recorded on `model` or any module inside it."""
    found = {}
    for module in model.modules():
        found.update(module.__dict__.get(MODULES_TO_SAVE_ATTRIBUTE, {}))
    return found


def clear_modules_to_save(model):
    for module in model.modules():
        module.__dict__.pop(MODULES_TO_SAVE_ATTRIBUTE, None)


@torch.no_grad()
def modality_routing_weights(model, modality):
    """{adapter key: [1, E]} of the language side's adapters for "text" or "image" in a patched
    vision-language model: what every sample of that modality routes with (it depends on the
    modality alone), e.g. for merge_adapters or an export."""
    embedding = modality_embedding(model)
    if embedding is None:
        raise ValueError("modality_routing_weights: the model has no modality routing")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}")
    token = embedding.weight[MODALITIES[modality]][None, None]
    weights = {}
    for adapted in adapted_norms(model):
        if adapted.routing_context is not None and adapted.routing_context.embedding is embedding:
            weights[adapted.key] = adapted.adapter.routing_weights(adapted.norm(token))
    return weights
