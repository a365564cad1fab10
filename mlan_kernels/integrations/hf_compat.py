"""What differs between the transformers releases we support, in one place.

Each helper finds things by type or by the signature the installed release has, never by a
keyword name that a release may rename:
- `find_cache`: a decoder layer's KV cache among its call arguments. Its keyword has been
  `past_key_value` (4.45-4.55), `past_key_values` (4.56-5.23) and `cache` (5.24+).
- `cached_length`: tokens a cache holds for one layer (4.45's HybridCache refuses the
  per-layer query).
- `cache_keyword` / `new_dynamic_cache`: how to hand a fresh `DynamicCache` to a model's
  top-level forward (`DynamicCache(config=...)` exists from 4.56 on).
- `enable_gradient_checkpointing`: non-reentrant checkpointing through whichever method the
  release has (`activation_checkpointing_enable` from 5.x, `gradient_checkpointing_enable`
  before; 4.x defaults to the reentrant variant, which fails with a frozen base).

transformers is imported lazily, so `import mlan_kernels` does not import it.
"""
import inspect
import sys


def _cache_type():
    """transformers' `Cache` base class, or None when transformers was never imported (then
    no argument can be a Cache)."""
    module = sys.modules.get("transformers.cache_utils")
    return getattr(module, "Cache", None)


def find_cache(args, kwargs):
    """The first `transformers.cache_utils.Cache` among a call's positional and keyword
    arguments (whatever the keyword is called), or None."""
    cache_type = _cache_type()
    if cache_type is None:
        return None
    for value in (*args, *kwargs.values()):
        if isinstance(value, cache_type):
            return value
    return None


def cached_length(cache, layer_index: int) -> int:
    """Tokens `cache` holds for decoder layer `layer_index`. transformers 4.45's HybridCache
    (Gemma 2) refuses get_seq_length(layer_idx); its preallocated keys are read directly."""
    try:
        return int(cache.get_seq_length(layer_index))
    except ValueError:
        keys = cache.key_cache[layer_index]                 # [B, heads, max_length, head_dim]
        return int(keys[0, 0].any(dim=-1).sum())


def cache_keyword(model) -> str:
    """The keyword under which `model.forward` takes a KV cache: "cache" on releases that
    renamed it, else "past_key_values"."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def new_dynamic_cache(config):
    """An empty `DynamicCache` for a model with HF config `config` (layer types from the config
    where the release supports that, e.g. sliding-window layers)."""
    from transformers import DynamicCache
    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config)
    return DynamicCache()


def enable_gradient_checkpointing(model, **checkpoint_kwargs):
    """Turn on activation (gradient) checkpointing of a HF model with `use_reentrant=False`
    unless given, which works with a frozen base (no input requires grad); returns model.

    checkpoint_kwargs go to `torch.utils.checkpoint.checkpoint`. Users who enable it through
    transformers themselves should pass the same:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    """
    checkpoint_kwargs.setdefault("use_reentrant", False)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    return model
