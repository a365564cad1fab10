"""Shared machinery that puts MM-Adapters into HuggingFace transformer layers.

Mechanism: the norm in front of an attention (or MLP) block is replaced by an `AdaptedNorm`
holding the original norm (`.norm`) and an `MMAdapter` (`.adapter`):

    layer.input_layernorm = AdaptedNorm(norm=<original RMSNorm>, adapter=MMAdapter(D, ...))
    forward: y = adapter(norm(x))            x, y: [B, L, D]

Wrapping a submodule (rather than monkey-patching a class's `forward`) keeps the adapter an
ordinary child module, so `model.to()`, dtype casts, `state_dict`, gradient checkpointing,
`torch.compile` and PEFT wrapping see it like any other layer, other instances of the class are
untouched, and `unpatch` puts the very same norm object back (base outputs bit-identical).

Routing token: position 0 of the adapter input (`MMAdapter` routes row b by x[b, 0]). During
KV-cache decoding the input is only the new token, so the routing weights are computed at
prefill and cached on the `AdaptedNorm`: a forward pre-hook on each decoder layer finds the
layer's KV cache among its call arguments by type (whatever the release calls the keyword, see
hf_compat.find_cache) and sets `phase` on its AdaptedNorms:
    "full"    no cache (training, recompute)      -> router on x[:, 0]
    "prefill" cache present but empty             -> router on x[:, 0], weights cached
    "decode"  cache already holds this layer's KV -> the cached [B, E] weights
"""
import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig
from ..modules import MMAdapter
from .hf_compat import cached_length, find_cache

STATE_ATTRIBUTE = "_mlan_patch_state"


@dataclass(frozen=True)
class Site:
    """Where one adapter goes inside a layer: the norm attribute it wraps, the nn.Linear
    modules (paths relative to the layer) that read the adapter output (used by merging), and
    the routing token: "first" = position 0 of each sample, "mean" = the mean over positions
    (vision towers without a CLS token)."""
    name: str            # "attn" | "mlp"
    norm_attribute: str  # e.g. "input_layernorm"
    consumers: tuple     # e.g. ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    routing: str = "first"


class AdaptedNorm(nn.Module):
    """norm followed by an MM-Adapter: x [B, L, D] -> adapter(norm(x)) [B, L, D].

    key: a stable name such as "llama.layers.3.attn" (checkpoints use it, so wrapping the
    model in PEFT or another container does not change adapter names). backend is passed to
    the op ("auto" | "reference" | "triton" | ...). sequence_first (LaVIN compat, CLIP): the
    adapter sees [L, B, D], as in LaVIN's sequence-first CLIP, so position l of every sample is
    routed by sample 0's token l; routing weights are then [L, E].
    """
    sequence_first = False

    def __init__(self, norm: nn.Module, adapter: MMAdapter, key: str, site: Site):
        super().__init__()
        self.norm = norm
        self.adapter = adapter
        self.key = key
        self.site = site
        self.backend = "auto"
        self.phase = "full"
        self.record_routing = False
        self.cached_routing_weights = None      # [B, E] fp32, set at prefill / when recording
        self.single_modality = None             # passed to the op; see set_single_modality

    def forward(self, hidden_states):
        normed = self.norm(hidden_states)
        if normed.dim() != 3:
            raise ValueError(f"{self.key}: adapter input must be [B, L, D], got {list(normed.shape)}")
        if self.sequence_first:
            normed = normed.transpose(0, 1)
        weights = None
        if self.phase == "decode":
            weights = self.cached_routing_weights
            if weights is None or weights.shape[0] != normed.shape[0]:
                raise RuntimeError(
                    f"{self.key}: decoding with a KV cache needs the routing weights cached at "
                    f"prefill for the same batch (got {None if weights is None else list(weights.shape)} "
                    f"for batch {normed.shape[0]}); decode the batch that was prefilled")
        elif self.site.routing == "mean" and normed.shape[1] > 0:   # differentiable [B, E]
            weights = self.adapter.routing_weights(normed.mean(1, keepdim=True))
        if self.phase == "prefill" or self.record_routing:
            with torch.no_grad():
                self.cached_routing_weights = (self.adapter.routing_weights(normed).detach()
                                               if weights is None else weights.detach())
        out = self.adapter(normed, weights=weights, backend=self.backend,
                           single_modality=self.single_modality)
        return out.transpose(0, 1) if self.sequence_first else out

    def extra_repr(self):
        return f"key={self.key!r}, backend={self.backend!r}"


def adapted_norms(model: nn.Module):
    """All AdaptedNorms of `model` (in module order), including merged-away ones."""
    found = [module for module in model.modules() if isinstance(module, AdaptedNorm)]
    for module in model.modules():
        merged = module.__dict__.get("_mlan_merged")
        if merged:
            found.extend(entry["adapted"] for entry in merged.values())
    return found


def adapters(model: nn.Module):
    """{key: MMAdapter} of every adapter in `model`, e.g. {"llama.layers.0.attn": MMAdapter}."""
    return {adapted.key: adapted.adapter for adapted in adapted_norms(model)}


def set_backend(model: nn.Module, backend: str):
    """Choose the op backend ("auto" | "reference" | "triton" | "cuda" | "cpu") of all adapters."""
    for adapted in adapted_norms(model):
        adapted.backend = backend


def set_single_modality(model: nn.Module, value, component: str = "llama"):
    """Tell the adapters of `component` ("llama" | "clip" | None = all) whether every batch
    holds one modality: True = all samples share the routing weights (the op uses sample 0's,
    no check; MLAN's modality-grouped batches through a LaVIN LLaMA, whose router reads the
    modality token), False = never, None = per sample (the default; detected on the host only
    for CPU tensors, no device sync: the Triton path runs the general kernels).
    Do not set True on CLIP adapters: they route on each image's CLS token (None is right)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"value must be True, False or None, got {value!r}")
    for adapted in adapted_norms(model):
        if component is None or adapted.key.split(".")[0] == component:
            adapted.single_modality = value


def reset_routing_cache(model: nn.Module):
    """Forget routing weights cached at the last prefill (done automatically on a new prefill)."""
    for adapted in adapted_norms(model):
        adapted.cached_routing_weights = None
        adapted.phase = "full"


def _routing_phase_hook(layer, args, kwargs):
    """Forward pre-hook of a decoder layer: set each AdaptedNorm's phase from the KV cache
    (a transformers Cache passed positionally or under any keyword)."""
    cache = find_cache(args, kwargs)
    if cache is None:
        phase = "full"
    else:
        layer_index = getattr(getattr(layer, "self_attn", None), "layer_idx", 0) or 0
        phase = "decode" if cached_length(cache, layer_index) > 0 else "prefill"
    for child in layer.children():
        if isinstance(child, AdaptedNorm):
            child.phase = phase


def _patch_records(model):
    """{component: (module holding the record, record)} for every patched component in model."""
    records = {}
    for module in model.modules():
        for component, record in module.__dict__.get(STATE_ATTRIBUTE, {}).items():
            records.setdefault(component, (module, record))
    return records


def patch_state(model, component=None):
    """{component: record} of `model` (or one component's record); None if not patched.

    A record holds "config" (AdapterConfig), "info" (model_class, hidden_size, num_layers),
    "layers", "sites", the routing hooks and the requires_grad flags before patching."""
    records = {name: record for name, (_, record) in _patch_records(model).items()}
    if component is not None:
        return records.get(component)
    return records or None


def patch_layers(model, layers, sites, component, config: AdapterConfig, freeze_base: bool,
                 cache_aware: bool, info: dict):
    """Wrap `site.norm_attribute` of every layer in `layers` with an AdaptedNorm.

    layers: the transformer blocks in order (index i -> key f"{component}.layers.{i}.{site}").
    cache_aware: register the routing-phase pre-hook (decoder layers with a KV cache).
    config.compat == "lavin": the adapters round their routing weights through fp16, and a
    "clip" component's adapters route sequence-first (LaVIN's CLIP runs [L, N, D]).
    Idempotent: a component patched with the same config is left as is; a different config
    raises ValueError (call `unpatch` first).
    """
    existing = patch_state(model, component)
    if existing is not None:
        if existing["config"] == config:
            return model
        raise ValueError(f"{component} is already patched with {existing['config']}; "
                         f"call unpatch(model) before patching with {config}")
    if not layers:
        raise ValueError(f"found no {component} layers to patch in {type(model).__name__}")
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    hooks = []
    for index, layer in enumerate(layers):
        for site in sites:
            norm = getattr(layer, site.norm_attribute)
            reference = next(iter(norm.parameters()), None)
            factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
            dim = info["hidden_size"]
            adapter = MMAdapter(dim, config, **factory)
            key = f"{component}.layers.{index}.{site.name}"
            adapted = AdaptedNorm(norm, adapter, key, site).train(layer.training)  # model.eval() kept
            adapted.sequence_first = config.compat == "lavin" and component == "clip"  # LaVIN's [L, N, D]
            setattr(layer, site.norm_attribute, adapted)
        if cache_aware:
            hooks.append(layer.register_forward_pre_hook(_routing_phase_hook, with_kwargs=True))
    model.__dict__.setdefault(STATE_ATTRIBUTE, {})[component] = {
        "config": config, "layers": list(layers), "sites": tuple(sites), "hooks": hooks,
        "requires_grad": requires_grad, "info": dict(info)}
    if freeze_base:
        freeze_all_but_adapters(model)
    from .export import install_save_guard        # export imports this module
    install_save_guard(model)                     # save_pretrained raises while adapters are in
    return model


def model_config(model):
    """The first `config` with a hidden_size found in `model` (a HF PretrainedConfig)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "hidden_size"):
            return config
    raise ValueError(f"cannot find a config with hidden_size in {type(model).__name__}")


def freeze_all_but_adapters(model: nn.Module, extra=()):
    """requires_grad=False on every parameter except MM-Adapters (and modules in `extra`).

    Inside a PEFT-wrapped part of the model the flags PEFT set are kept (its base is already
    frozen and its own adapters, e.g. LoRA, stay trainable); every other part is frozen (e.g. the
    CLIP tower of a LaVIN assembly whose LLaMA alone is PEFT-wrapped).
    """
    peft_owned = {id(p) for module in model.modules() if hasattr(module, "peft_config")
                  for p in module.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in peft_owned:
            parameter.requires_grad_(False)
    for adapted in adapted_norms(model):
        adapted.adapter.requires_grad_(True)
    for module in extra:
        module.requires_grad_(True)


def _swap_in_norms(record) -> list:
    """Put each wrapped norm of a patch record back in its layer -> [(layer, attribute, AdaptedNorm)]."""
    swapped = []
    for layer in record["layers"]:
        for site in record["sites"]:
            adapted = getattr(layer, site.norm_attribute)
            if isinstance(adapted, AdaptedNorm):
                setattr(layer, site.norm_attribute, adapted.norm)
                swapped.append((layer, site.norm_attribute, adapted))
    return swapped


@contextlib.contextmanager
def unpatched(model: nn.Module):
    """The base model's module tree while inside: every AdaptedNorm is swapped for the norm it
    wraps, and swapped back on exit (the same adapter objects: weights, requires_grad flags and
    optimizer state are untouched).

        with mk.unpatched(model):
            model.save_pretrained("base/")    # the base's keys, loadable by from_pretrained

    Raises RuntimeError while adapters are merged (the projections then hold merged weights).
    """
    if any(module.__dict__.get("_mlan_merged") for module in model.modules()):
        raise RuntimeError("unpatched(model): adapters are merged into the projections; "
                           "call unmerge_adapters(model) first")
    swapped = [entry for _, record in _patch_records(model).values() for entry in _swap_in_norms(record)]
    try:
        yield model
    finally:
        for layer, attribute, adapted in swapped:
            setattr(layer, attribute, adapted)


def unpatch(model: nn.Module, component=None):
    """Remove adapters (all components, or one), restoring the original norm modules,
    merged projection weights (see merge.unmerge_adapters) and requires_grad flags."""
    from .merge import unmerge_adapters   # merge imports this module

    unmerge_adapters(model)
    for name, (holder, record) in _patch_records(model).items():
        if component is not None and name != component:
            continue
        for hook in record["hooks"]:
            hook.remove()
        _swap_in_norms(record)
        for parameter in model.parameters():
            if id(parameter) in record["requires_grad"]:
                parameter.requires_grad_(record["requires_grad"][id(parameter)])
        holder.__dict__[STATE_ATTRIBUTE].pop(name)
        if not holder.__dict__[STATE_ATTRIBUTE]:
            del holder.__dict__[STATE_ATTRIBUTE]
    if not _patch_records(model):
        from .export import remove_save_guard
        remove_save_guard(model)
    return model


class record_routing_weights:
    """Context manager: every AdaptedNorm stores the [B, E] routing weights of the forwards run
    inside it; `.weights` is then {key: [B, E]} (the last forward's).

        with record_routing_weights(model) as recorder:
            model(input_ids)
        recorder.weights["llama.layers.0.attn"]   # [B, E]
    """

    def __init__(self, model):
        self.norms = adapted_norms(model)
        self.weights = {}

    def __enter__(self):
        for adapted in self.norms:
            adapted.record_routing = True
            adapted.cached_routing_weights = None
        return self

    def __exit__(self, *exc):
        for adapted in self.norms:
            adapted.record_routing = False
            if adapted.cached_routing_weights is not None:
                self.weights[adapted.key] = adapted.cached_routing_weights
        return False
