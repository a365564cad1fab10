"""Re-parameterization: fold an adapter into the nn.Linear layers that read its output.

An adapter with known routing weights w [E] (no dropout at inference) is affine:
    A(x) = x + H(x) Uᵀ + c,   H(x) = W_A x + b_A,   U = s Σ_e w_e M_e [D, r],   c = s Σ_e w_e b_U[e]
so a consumer W x + b (q/k/v after the attn adapter; gate/up or fc1 after the mlp adapter) becomes
    W' = W (I + U W_A),   b' = b + W (U b_A + c).
Merging replaces the AdaptedNorm by its plain norm (no adapter module in the forward path) and
keeps copies of the original consumer weights so that `unmerge_adapters` restores them exactly.
The router makes U and c modality dependent: merge with the weights of one modality.
"""
import torch
from torch import nn

from ..functional import dense_up_weight
from .patching import AdaptedNorm

MERGED_ATTRIBUTE = "_mlan_merged"


def combined_up(adapter, weights: torch.Tensor):
    """weights [E] -> (U [D, r], c [D]) in fp64: U = s Σ_e w_e M_e, c = s Σ_e w_e b_U[e]."""
    weights = weights.detach().to(torch.float64).reshape(-1)
    if weights.shape[0] != adapter.experts:
        raise ValueError(f"weights must have {adapter.experts} entries (one per expert), "
                         f"got shape {list(weights.shape)}")
    dense = dense_up_weight(adapter.up.weight.detach().to(torch.float64), adapter.groups)  # [E, D, r]
    up = adapter.scale * torch.einsum("e,edr->dr", weights, dense)
    bias = adapter.scale * weights @ adapter.up.bias.detach().to(torch.float64)
    return up, bias


def _weights_for(key, weights):
    """The [E] routing vector of adapter `key` from a tensor ([E] or [1, E]) or a {key: tensor} dict."""
    value = weights.get(key) if isinstance(weights, dict) else weights
    if value is None:
        raise KeyError(f"no routing weights given for adapter {key!r}")
    value = torch.as_tensor(value)
    if value.dim() == 2:
        # Equal up to rounding: a GEMM may round equal routing tokens differently by row.
        if not torch.allclose(value, value[:1].expand_as(value), rtol=1e-5, atol=1e-7):
            raise ValueError(f"{key}: routing weights differ between samples; merge needs one "
                             f"routing vector (one modality), got shape {list(value.shape)}")
        value = value[0]
    return value


def _fold(linear: nn.Linear, adapter, weights):
    """W' = W (I + U W_A), b' = b + W (U b_A + c), computed in fp64, stored in W's dtype."""
    up, bias = combined_up(adapter, weights)
    down_weight = adapter.down.weight.detach().to(torch.float64)        # [r, D]
    down_bias = adapter.down.bias.detach().to(torch.float64)            # [r]
    weight = linear.weight.detach().to(torch.float64)                   # [out, D]
    new_weight = weight + (weight @ up) @ down_weight
    new_bias = weight @ (up @ down_bias + bias)
    if linear.bias is not None:
        new_bias = new_bias + linear.bias.detach().to(torch.float64)
    return new_weight, new_bias


def merge_adapters(model: nn.Module, weights, component=None):
    """Fold every (unmerged) adapter of `model` (of one `component`, "llama" | "clip", if
    given) into its consumer linears.

    weights: routing weights — a tensor [E] (or [1, E]) used for every adapter, or a dict
    {adapter key: [E] or [B, E] with equal rows}, e.g. `record_routing_weights(...).weights`
    or LavinModel.modality_routing_weights("image"). A consumer without a bias gets one.
    All or nothing: a missing key, a vector of the wrong length or a consumer that is not
    nn.Linear raises before any weight changes. A whole vision-language model merges its language
    side for one modality: merge_adapters(model, modality_routing_weights(model, "image"),
    component="llama") (its vision adapters route by image content and stay).
    """
    plans = []        # every adapter's weights and consumers are checked before any change
    for module in list(model.modules()):
        for child_name, adapted in list(module.named_children()):
            if not isinstance(adapted, AdaptedNorm) or (
                    component is not None and adapted.key.split(".")[0] != component):
                continue
            vector = _weights_for(adapted.key, weights)
            experts = adapted.adapter.router.weight.shape[0]
            if vector.shape != (experts,):
                raise ValueError(f"weights must have {experts} entries (one per expert), got "
                                 f"shape {list(vector.shape)}")
            for path in adapted.site.consumers:
                linear = module.get_submodule(path)
                if type(linear) is not nn.Linear:
                    raise TypeError(f"{adapted.key}: can only merge into nn.Linear, {path} is "
                                    f"{type(linear).__name__} (merge before wrapping with PEFT)")
            plans.append((module, child_name, adapted, vector))
    for module, child_name, adapted, vector in plans:
        originals = {}
        for path in adapted.site.consumers:       # one fp64 fold at a time: bounded memory
            linear = module.get_submodule(path)
            new_weight, new_bias = _fold(linear, adapted.adapter, vector)
            originals[path] = (linear.weight.detach().clone(),
                               None if linear.bias is None else linear.bias.detach().clone())
            with torch.no_grad():
                linear.weight.copy_(new_weight.to(linear.weight.dtype))
                if linear.bias is None:
                    linear.bias = nn.Parameter(new_bias.to(linear.weight.dtype),
                                               requires_grad=False)
                else:
                    linear.bias.copy_(new_bias.to(linear.bias.dtype))
        module.__dict__.setdefault(MERGED_ATTRIBUTE, {})[child_name] = {
            "adapted": adapted, "originals": originals}
        setattr(module, child_name, adapted.norm)
    return model


def unmerge_adapters(model: nn.Module):
    """Undo merge_adapters: original consumer weights back (bit-exact), AdaptedNorms back."""
    for module in list(model.modules()):
        merged = module.__dict__.pop(MERGED_ATTRIBUTE, None)
        if not merged:
            continue
        for child_name, entry in merged.items():
            for path, (weight, bias) in entry["originals"].items():
                linear = module.get_submodule(path)
                with torch.no_grad():
                    linear.weight.copy_(weight)
                    if bias is None:
                        linear.bias = None
                    else:
                        linear.bias.copy_(bias)
            setattr(module, child_name, entry["adapted"])
    return model


def is_merged(model: nn.Module) -> bool:
    """Whether any adapter of `model` is currently merged."""
    return any(module.__dict__.get(MERGED_ATTRIBUTE) for module in model.modules())
