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

from ..config import AdapterConfig
from .patching import Site, model_config, patch_layers


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

MODEL_TYPES = {
    "llama": DECODER, "mistral": DECODER, "qwen2": DECODER, "qwen3": DECODER, "gemma": DECODER,
    "gemma2": GEMMA2, "gemma3_text": GEMMA2, "phi3": PHI3,
    "clip_vision_model": CLIP, "siglip_vision_model": SIGLIP,
}


def model_type(model) -> str:
    """config.model_type of the first HF config found in `model` (a PEFT wrapper or container
    is searched too)."""
    return model_config(model).model_type


DEFAULTS = {"llama": DECODER, "clip": CLIP}   # for model types outside the table, see family_of


def family_of(model, component=None) -> Family:
    """The table row of `model`'s model type. ValueError listing the supported types (and how to
    add one) when it is not in the table, or when it is not a `component` ("llama" | "clip").
    With a component, a type outside the table whose blocks have that component's default
    layout (LLaMA's or CLIP's attributes, e.g. LLaVA's "llava_llama") gets that layout."""
    kind = model_type(model)
    family = MODEL_TYPES.get(kind)
    if family is None and component is not None and blocks(model, DEFAULTS[component]):
        family = DEFAULTS[component]
    if family is None:
        raise ValueError(
            f"model_type {kind!r} is not supported; supported: {', '.join(sorted(MODEL_TYPES))}. "
            f"To add one, add a Family row (block attributes + Site per placement) to "
            f"mlan_kernels/integrations/families.py MODEL_TYPES")
    if component is not None and family.component != component:
        side = {"llama": "a language model", "clip": "a vision tower"}[component]
        raise ValueError(f"model_type {kind!r} is not {side}; supported: "
                         f"{', '.join(sorted(k for k, f in MODEL_TYPES.items() if f.component == component))}")
    return family


def blocks(model, family: Family):
    """The transformer blocks of `model` in module order: modules with every block attribute."""
    return [module for module in model.modules()
            if all(hasattr(module, name) for name in family.block_attributes)]


def patch(model, config: AdapterConfig = None, freeze_base=True, component=None, **settings):
    """Insert MM-Adapters into every block of a supported HF model (see MODEL_TYPES), in place;
    returns model. config: AdapterConfig, or its fields as keywords (rank=8, experts=2, groups=2,
    scale=1.0, temperature=10.0, dropout_p=0.1, placement="attn", compat=None).
    freeze_base: only adapter parameters keep requires_grad. Patching again with the same
    config is a no-op; with a different one it raises ValueError (unpatch first)."""
    config = AdapterConfig.resolve(config, **settings)
    family = family_of(model, component)
    sites = [family.sites["attn"]] + ([family.sites["mlp"]] if config.placement == "block" else [])
    hf_config = model_config(model)
    info = {"model_class": type(model).__name__, "model_type": hf_config.model_type,
            "hidden_size": hf_config.hidden_size, "num_layers": hf_config.num_hidden_layers}
    return patch_layers(model, blocks(model, family), sites, family.component, config, freeze_base,
                        family.cache_aware, info)


def support_table() -> str:
    """The README's support table (Markdown), rendered from MODEL_TYPES; tests keep them equal."""
    rows = ["| model_type | side | `attn` adapter wraps → merges into | `block` adds → merges into "
            "| KV-cached generate | `torch.compile` | routing token |",
            "|---|---|---|---|---|---|---|"]
    for kind, family in sorted(MODEL_TYPES.items(), key=lambda item: (item[1].component != "llama", item[0])):
        side = {"llama": "decoder", "clip": "vision"}[family.component]
        cells = [f"`{site.norm_attribute}` → {', '.join(c.split('.')[-1] for c in site.consumers)}"
                 for site in (family.sites["attn"], family.sites["mlp"])]
        generate = "yes (prefill routing)" if family.cache_aware else "n/a"
        routing = {"first": "position 0", "mean": "mean of patches"}[family.sites["attn"].routing]
        rows.append(f"| `{kind}` | {side} | {cells[0]} | {cells[1]} | {generate} | one block "
                    f"(aot_eager) | {routing} |")
    return "\n".join(rows)
