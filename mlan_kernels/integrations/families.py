"""The model-type table: where MM-Adapters go in each supported HuggingFace family, and `patch`.

Keyed by `config.model_type` (as Liger-Kernel's and PEFT's tables are). Each entry names the
side of the LaVIN assembly it belongs to ("llama": the language model, "clip": the vision
tower; these are also the adapter-key prefixes in checkpoints, whatever the family), the
attributes that identify one transformer block, and per placement the norm an adapter wraps and
the linears that read it (merging folds the adapter into those):

    family                          attn site: norm -> consumers           block adds: norm -> consumers
    llama mistral qwen2 qwen3 gemma input_layernorm -> q/k/v_proj           post_attention_layernorm -> gate/up_proj
    gemma2 gemma3_text              input_layernorm -> q/k/v_proj           pre_feedforward_layernorm -> gate/up_proj
    phi3                            input_layernorm -> qkv_proj (fused)     post_attention_layernorm -> gate_up_proj (fused)
    clip_vision_model               layer_norm1 -> q/k/v_proj               layer_norm2 -> fc1
    siglip_vision_model             layer_norm1 -> q/k/v_proj               layer_norm2 -> fc1

Family details that need no code here: Gemma's `(1 + weight)` RMSNorm and its embedding scaling
sit inside the wrapped norm and the model's own forward; grouped-query attention only changes
the consumers' output widths (merging is per linear); sliding-window layers and tied embeddings
do not touch the norms. Gemma2/3 normalise *after* attention too (`post_attention_layernorm`),
so their MLP adapter wraps `pre_feedforward_layernorm`, the norm whose output the MLP reads.

Routing token: position 0 of each sample (LLaMA-style decoders: LaVIN's modality token; CLIP: the
CLS token). SigLIP has no CLS token: position 0 is the top-left patch, so its adapters route by
the mean of all patch tokens (a summary of the whole image, invariant to where content sits;
SigLIP's own pooling head also reads every patch).

To add a family: add a `Family` row below (its block attributes and `Site`s), and a tiny config
to `tests/test_families.py::FAMILIES`; the contract suite then runs over it.
"""
from dataclasses import dataclass

from torch import nn

from ..config import AdapterConfig
from .merge import unmerge_adapters
from .save_guard import install_save_guard, remove_save_guard
from .patching import STATE_ATTRIBUTE, Site, freeze_all_but_adapters, model_config, patch_layers, patch_records, swap_in_norms
from .vlm import (attach_modality_routing, clear_modules_to_save, detach_modality_routing, modality_embedding,
                  resolve_modules_to_save, set_modules_to_save, vision_language_config, vision_language_parts)


@dataclass(frozen=True)
class Family:
    """One row of the table. component: "llama" | "clip"; block_attributes: attributes every
    transformer block of the family has (how blocks are found, also inside PEFT wrappers);
    sites: {"attn": Site, "mlp": Site}; cache_aware: decoder with a KV cache (routing cached at
    prefill)."""
    component: str
    block_attributes: tuple
    sites: dict
    cache_aware: bool


def _attention(norm, consumers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               routing="first"):
    return Site("attn", norm, consumers, routing)


DECODER = Family("llama", ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"), {
    "attn": _attention("input_layernorm"),
    "mlp": Site("mlp", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))}, True)
GEMMA2 = Family("llama", ("input_layernorm", "pre_feedforward_layernorm", "self_attn", "mlp"), {
    "attn": _attention("input_layernorm"),
    "mlp": Site("mlp", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"))}, True)
PHI3 = Family("llama", DECODER.block_attributes, {
    "attn": _attention("input_layernorm", ("self_attn.qkv_proj",)),
    "mlp": Site("mlp", "post_attention_layernorm", ("mlp.gate_up_proj",))}, True)
CLIP = Family("clip", ("layer_norm1", "layer_norm2", "self_attn", "mlp"), {
    "attn": _attention("layer_norm1"),
    "mlp": Site("mlp", "layer_norm2", ("mlp.fc1",))}, False)
SIGLIP = Family("clip", CLIP.block_attributes, {
    "attn": _attention("layer_norm1", routing="mean"),
    "mlp": Site("mlp", "layer_norm2", ("mlp.fc1",), "mean")}, False)

QWEN2_VL_VISION = Family("clip", ("norm1", "norm2", "attn", "mlp"), {
    "attn": Site("attn", "norm1", ("attn.qkv",), "image_mean"),
    "mlp": Site("mlp", "norm2", ("mlp.fc1",), "image_mean")}, False)
QWEN2_5_VL_VISION = Family("clip", QWEN2_VL_VISION.block_attributes, {
    "attn": QWEN2_VL_VISION.sites["attn"],
    "mlp": Site("mlp", "norm2", ("mlp.gate_proj", "mlp.up_proj"), "image_mean")}, False)

MODEL_TYPES = {
    "llama": DECODER, "mistral": DECODER, "qwen2": DECODER, "qwen3": DECODER, "gemma": DECODER,
    "gemma2": GEMMA2, "gemma3_text": GEMMA2, "phi3": PHI3,
    "clip_vision_model": CLIP, "siglip_vision_model": SIGLIP,
}
# The sides of vision-language models that exist only inside one (no standalone HF class).
PART_TYPES = {
    "qwen2_vl_text": DECODER, "qwen2_5_vl_text": DECODER,
    "idefics3_vision": SIGLIP, "smolvlm_vision": SIGLIP,
    "qwen2_vl_vision": QWEN2_VL_VISION, "qwen2_5_vl_vision": QWEN2_5_VL_VISION,
}
# Whole vision-language models -> (language side, vision side) of their default configs; each side
# is patched as its own row of MODEL_TYPES / PART_TYPES (vlm.py finds them by model_type, so
# e.g. a LLaVA with a Mistral or Qwen2 language model works the same).
VISION_LANGUAGE_TYPES = {
    "llava": ("llama", "clip_vision_model"), "llava_next": ("llama", "clip_vision_model"),
    "llava_onevision": ("qwen2", "siglip_vision_model"), "paligemma": ("gemma", "siglip_vision_model"),
    "gemma3": ("gemma3_text", "siglip_vision_model"), "idefics3": ("llama", "idefics3_vision"),
    "smolvlm": ("llama", "smolvlm_vision"), "qwen2_vl": ("qwen2_vl_text", "qwen2_vl_vision"),
    "qwen2_5_vl": ("qwen2_5_vl_text", "qwen2_5_vl_vision"),
}


def model_type(model) -> str:
    """config.model_type of the first HF config found in `model` (a PEFT wrapper or container
    is searched too)."""
    return model_config(model).model_type


SIDE_NAMES = {"llama": "language model", "clip": "vision tower"}
DEFAULTS = {"llama": DECODER, "clip": CLIP}   # for model types outside the table, see family_of


def family_of(model, component=None) -> Family:
    """The table row of `model`'s model type. ValueError listing the supported types (and how to
    add one) when it is not in the table, or when it is not a `component` ("llama" | "clip").
    With a component, a type outside the table whose blocks have that component's default
    layout (LLaMA's or CLIP's attributes, e.g. LLaVA's "llava_llama") gets that layout."""
    kind = model_type(model)
    table = {**MODEL_TYPES, **PART_TYPES}
    family = table.get(kind)
    if family is None and component is not None and blocks(model, DEFAULTS[component]):
        family = DEFAULTS[component]
    if family is None:
        raise ValueError(
            f"model_type {kind!r} is not supported; supported: {', '.join(sorted(table))}. "
            f"To add one, add a Family row (block attributes + Site per placement) to "
            f"mlan_kernels/integrations/families.py MODEL_TYPES")
    if component is not None and family.component != component:
        side = {"llama": "a language model", "clip": "a vision tower"}[component]
        raise ValueError(f"model_type {kind!r} is not {side}; supported: "
                         f"{', '.join(sorted(k for k, f in table.items() if f.component == component))}")
    return family


def blocks(model, family: Family):
    """The transformer blocks of `model` in module order: modules with every block attribute."""
    return [module for module in model.modules()
            if all(hasattr(module, name) for name in family.block_attributes)]


def patch(model, config: AdapterConfig = None, freeze_base=True, component=None,
          modules_to_save=None, modality_routing=None, **settings):
    """Insert MM-Adapters into every block of a supported HF model (see MODEL_TYPES), in place;
    returns model. config: AdapterConfig, or its fields as keywords (rank=8, experts=2, groups=2,
    scale=1.0, temperature=10.0, dropout_p=0.1, placement="attn", compat=None).

    A whole vision-language model (VISION_LANGUAGE_TYPES: LLaVA, Qwen2-VL, ...) gets adapters in
    its language model and its vision tower; component="llama" or "clip" adapts one side only.
    Every side is checked before any is patched: a side of an unsupported type is a ValueError
    naming it. modality_routing (vision-language models; default True): the language side's
    routers read each sample's modality (routing.py) instead of its first token.
    freeze_base: only adapter parameters (and the modality embedding) keep requires_grad.
    modules_to_save: names of modules that train beside the adapters and are saved in adapter
    checkpoints (PEFT's option: e.g. ["multi_modal_projector", "lm_head"]; a module matches when
    its qualified name is the name or ends with "." + name).
    Patching again with the same config is a no-op; with a different one it raises ValueError
    (unpatch first)."""
    config = AdapterConfig.resolve(config, **settings)
    if modality_routing not in (None, True, False):
        raise ValueError(f"modality_routing must be True, False or None, got {modality_routing!r}")
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    for _, record in patch_records(model).values():     # flags from before any patching win
        requires_grad.update(record["requires_grad"])
    extras = resolve_modules_to_save(model, modules_to_save or ())
    parts = vision_language_parts(model)
    if parts is None:
        if modality_routing:
            raise ValueError(f"modality_routing=True needs a vision-language model; "
                             f"{type(model).__name__} has no text_config and vision_config")
        targets = {"": model}
    else:
        sides = ("llama", "clip") if component is None else (component,)
        if any(side not in parts for side in sides):
            raise ValueError(f"component must be 'llama' or 'clip', got {component!r}")
        targets = {side: parts[side] for side in sides}
    families = {}
    for side, root in targets.items():
        try:
            families[side] = family_of(root, side or component)
        except ValueError as error:
            if not side:
                raise
            raise ValueError(f"{type(model).__name__}: cannot adapt its {SIDE_NAMES[side]} "
                             f"{type(root).__name__}: {error}") from None
    for side, root in targets.items():
        record = _patch_family(root, families[side], config, requires_grad)
        if side == "llama" and modality_routing is not False and "modality" not in record:
            attach_modality_routing(model, root, record)
    set_modules_to_save(model, extras)
    if freeze_base:
        freeze_all_but_adapters(model, extra=[*extras.values(), *filter(None, [modality_embedding(model)])])
    install_save_guard(model)         # save_pretrained raises while adapters are in
    return model


def _patch_family(root, family, config, requires_grad):
    """Patch one model (or one side of a vision-language model) -> its patch record."""
    sites = [family.sites["attn"]] + ([family.sites["mlp"]] if config.placement == "block" else [])
    layers = blocks(root, family)
    hf_config = model_config(root)
    info = {"model_class": type(root).__name__, "model_type": hf_config.model_type,
            "hidden_size": hf_config.hidden_size, "num_layers": len(layers)}
    patch_layers(root, layers, sites, family.component, config, False, family.cache_aware, info,
                 requires_grad)
    return root.__dict__[STATE_ATTRIBUTE][family.component]


def unpatch(model: nn.Module, component=None):
    """Remove adapters (all components, or one), restoring the original norm modules, merged
    projection weights (see merge.unmerge_adapters), requires_grad flags, and dropping the
    modality embedding and modules_to_save records."""
    unmerge_adapters(model)
    for name, (holder, record) in patch_records(model).items():
        if component is not None and name != component:
            continue
        for hook in record["hooks"]:
            hook.remove()
        detach_modality_routing(record)
        swap_in_norms(record)
        for parameter in model.parameters():
            if id(parameter) in record["requires_grad"]:
                parameter.requires_grad_(record["requires_grad"][id(parameter)])
        holder.__dict__[STATE_ATTRIBUTE].pop(name)
        if not holder.__dict__[STATE_ATTRIBUTE]:
            del holder.__dict__[STATE_ATTRIBUTE]
    if not patch_records(model):
        clear_modules_to_save(model)
        remove_save_guard(model)
    return model


ROUTING_NAMES = {"first": "position 0 (CLS)", "mean": "mean of patches", "image_mean": "mean of each image's patches"}


def support_table() -> str:
    """The README's support tables (Markdown), rendered from MODEL_TYPES, PART_TYPES and
    VISION_LANGUAGE_TYPES; tests keep them equal."""
    rows = ["| model_type | side | `attn` adapter wraps → merges into | `block` adds → merges into "
            "| KV-cached generate | `torch.compile` | routing token |",
            "|---|---|---|---|---|---|---|"]
    table = {**MODEL_TYPES, **PART_TYPES}
    for kind, family in sorted(table.items(), key=lambda item: (item[1].component != "llama", item[0])):
        side = {"llama": "decoder", "clip": "vision"}[family.component]
        if kind in PART_TYPES:
            side += " (inside its vision-language model)"
        cells = [f"`{site.norm_attribute}` → {', '.join(c.split('.')[-1] for c in site.consumers)}"
                 for site in (family.sites["attn"], family.sites["mlp"])]
        generate = "yes (prefill routing)" if family.cache_aware else "n/a"
        routing = "first real token" if family.cache_aware else ROUTING_NAMES[family.sites["attn"].routing]
        compiled = "not tested" if kind in PART_TYPES else "one block (aot_eager)"
        rows.append(f"| `{kind}` | {side} | {cells[0]} | {cells[1]} | {generate} | {compiled} | {routing} |")
    rows += ["", "| vision-language model_type | language side (default) | vision side (default) "
             "| language routing |", "|---|---|---|---|"]
    for kind, (language, vision) in sorted(VISION_LANGUAGE_TYPES.items()):
        rows.append(f"| `{kind}` | `{language}` | `{vision}` | modality embedding (image tokens in `input_ids`) |")
    return "\n".join(rows)
