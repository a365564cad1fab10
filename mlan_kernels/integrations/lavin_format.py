"""LaVIN's checkpoint format: reading it safely, and its parameter names <-> ours.

What LaVIN's training writes (util/misc.py `save_model`, once per epoch):
    torch.save({"model": {name: tensor for every parameter whose name contains "adapter"},
                "optimizer": optimizer.state_dict(), "epoch": int,
                "scaler": GradScaler.state_dict() or None, "args": argparse.Namespace}, path)
Its shipped scripts run under torchrun, so `name` is DDP's ("module.layers.0.adapter_attn...");
a single-process run saves the same names without "module.". Tensors are fp32.

LaVIN names (lavin/model.py, lavin/mm_adapter.py) -> ours (checkpoint.adapter_state_dict):
    layers.{i}.adapter_{attn|mlp}.{conv_A,conv_B,conv_D,expert_weights}.*   llama.layers.{i}.{attn|mlp}.*
    backbone.visual.transformer.resblocks.{i}.adapter_{attn|mlp}.*          clip.layers.{i}.{attn|mlp}.*
      (also read without "visual.": backbone.transformer.resblocks.{i}...)
    adapter_proj.conv_A / conv_B .{weight,bias}                             neck.down / neck.up
    adapter_modality_embedding.weight                                       modality_embedding.weight
Each RepAdapter_Router converts through MMAdapter.from_lavin_state_dict / to_lavin_state_dict.
Only torch.load(weights_only=True) reads files here unless the caller asks otherwise; the one
global allowed beyond tensors and plain containers is argparse.Namespace (LaVIN's "args").
"""
import argparse
import pickle
import re

import torch

from .checkpoint_validation import SITE, check_loaded_tensors, check_tensor_layout, check_torch_zip
from ..modules import LAVIN_KEYS, MMAdapter

LAVIN_SAFE_GLOBALS = (argparse.Namespace,)
DDP_PREFIX = "module."
LAVIN_ADAPTER_PATTERNS = (
    (re.compile(r"^layers\.(\d+)\.adapter_(attn|mlp)\.$"), "llama"),
    (re.compile(r"^backbone\.(?:visual\.)?transformer\.resblocks\.(\d+)\.adapter_(attn|mlp)\.$"), "clip"),
)
LAVIN_ADAPTER_PREFIX = re.compile(r"^(.*\.adapter_(?:attn|mlp)\.)")
LAVIN_EXTRA_NAMES = {"adapter_proj.conv_A.weight": "neck.down.weight",
                     "adapter_proj.conv_A.bias": "neck.down.bias",
                     "adapter_proj.conv_B.weight": "neck.up.weight",
                     "adapter_proj.conv_B.bias": "neck.up.bias",
                     "adapter_modality_embedding.weight": "modality_embedding.weight"}
OUR_SITE = SITE


def read_lavin_file(path, weights_only=True):
    """torch.load a LaVIN .pth on the CPU. weights_only=True (default) refuses every pickled
    global except argparse.Namespace; the refusal is an UnpicklingError naming the file. The file
    is checked first (check_torch_zip: a whole, uncompressed torch.save file, so loading it costs
    at most its size) and every tensor in it after (check_loaded_tensors: no expanded or
    overlapping tensor claims more elements than it stores); those failures are ValueErrors."""
    check_torch_zip(path)
    try:
        if not weights_only:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        else:
            payload = _load_weights_only(path)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise pickle.UnpicklingError(
            f"{path}: refused by torch.load(weights_only=True): only tensors, plain containers and "
            f"argparse.Namespace are allowed ({reason[:200]}); pass weights_only=False only for a "
            f"file you trust") from error
    except (RuntimeError, EOFError, KeyError, IndexError, TypeError) as error:
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path}: unreadable torch file ({message[:200]})") from None
    check_loaded_tensors(payload, path)
    return payload


def _load_weights_only(path):
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:                  # torch 2.4: only the global registry exists
        torch.serialization.add_safe_globals(list(LAVIN_SAFE_GLOBALS))
        return torch.load(path, map_location="cpu", weights_only=True)
    with safe_globals(list(LAVIN_SAFE_GLOBALS)):
        return torch.load(path, map_location="cpu", weights_only=True)


def lavin_model_dict(payload, source):
    """The {name: tensor} dict of a LaVIN checkpoint: payload["model"] when present (LaVIN's
    training file), else the payload itself (a bare state dict). Errors name `source`."""
    if not isinstance(payload, dict):
        raise ValueError(f"{source}: expected a dict (LaVIN's {{'model': state_dict, ...}} or a "
                         f"state dict), got {type(payload).__name__}")
    if "model" in payload:
        if not isinstance(payload["model"], dict):
            raise ValueError(f"{source}: key 'model' must hold a state dict, got "
                             f"{type(payload['model']).__name__}")
        return payload["model"]
    return payload


def lavin_adapter_tensors(state_dict, source):
    """{LaVIN name without "module.": tensor} of every entry whose name contains "adapter" (what
    LaVIN saves as trainable; other names, e.g. base weights, are skipped). Every such entry must
    be a finite floating-point tensor; errors name `source` and the key."""
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: state dict keys must be str, got {key!r}")
        name = key[len(DDP_PREFIX):] if key.startswith(DDP_PREFIX) else key
        if "adapter" not in name:
            continue
        if name in tensors:
            raise ValueError(f"{source}: key {name!r} appears both with and without DDP's "
                             f"'module.' prefix")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{source}: key {key!r} must be a floating-point tensor, got {kind}")
        check_tensor_layout(value, f"{source}: key {key!r}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{source}: key {key!r} has non-finite values (nan or inf)")
        tensors[name] = value
    return tensors


def lavin_to_ours(tensors, source="state dict"):
    """{LaVIN name: tensor} (no "module.") -> ({our name: tensor}, [LaVIN names not understood]).
    A RepAdapter_Router missing one of its tensors, or with inconsistent shapes, or one CLIP
    adapter stored under both "backbone.transformer." and "backbone.visual.transformer." is a
    ValueError naming `source`."""
    ours, prefixes, sources = {}, set(), {}
    used = set()
    for name, value in tensors.items():
        if name in LAVIN_EXTRA_NAMES:
            ours[LAVIN_EXTRA_NAMES[name]] = value
            used.add(name)
        match = LAVIN_ADAPTER_PREFIX.match(name)
        if match:
            prefixes.add(match.group(1))
    for prefix in sorted(prefixes):
        for pattern, component in LAVIN_ADAPTER_PATTERNS:
            match = pattern.match(prefix)
            if not match:
                continue
            site = f"{component}.layers.{match.group(1)}.{match.group(2)}"
            if site in sources:
                raise ValueError(f"{source}: {site} is stored twice, as {sources[site]!r} and "
                                 f"{prefix!r}: one copy of each adapter expected")
            sources[site] = prefix
            try:
                adapter = MMAdapter.from_lavin_state_dict(tensors, prefix=prefix)
            except (KeyError, ValueError) as error:
                raise ValueError(f"{source}: {error.args[0]}") from None
            ours.update({f"{site}.{key}": value for key, value in adapter.state_dict().items()})
            used.update(prefix + key for key in LAVIN_KEYS)
    return ours, sorted(set(tensors) - used)


def from_lavin_state_dict(state_dict):
    """LaVIN names (with or without DDP's "module.") -> ours: {"llama.layers.3.attn.down.weight":
    ..., "neck.up.bias": ...}. Names without "adapter" and unknown adapter names are ignored."""
    return lavin_to_ours(lavin_adapter_tensors(state_dict, "state dict"))[0]


def ours_to_lavin(tensors, prefix=""):
    """{our name: tensor} -> {LaVIN name: tensor} (prefix: "" or "module."); inverse of
    lavin_to_ours for LaVIN's 2-expert adapters (CLIP names use backbone.visual.)."""
    lavin, sites = {}, {}
    reverse = {ours: theirs for theirs, ours in LAVIN_EXTRA_NAMES.items()}
    for name, value in tensors.items():
        match = OUR_SITE.match(name)
        if match:
            sites.setdefault(match.group(0), {})[name[match.end():]] = value
        elif name in reverse:
            lavin[prefix + reverse[name]] = value
        else:
            raise ValueError(f"tensor {name!r} has no LaVIN name")
    for site, state in sites.items():
        component, index, kind = OUR_SITE.match(site).groups()
        experts, dim, rank_per_group = state["up.weight"].shape
        rank = state["down.weight"].shape[0]
        adapter = MMAdapter(dim, rank=rank, experts=experts, groups=rank // rank_per_group,
                            device="meta")
        adapter.load_state_dict(state, strict=True, assign=True)
        where = "layers" if component == "llama" else "backbone.visual.transformer.resblocks"
        lavin.update(adapter.to_lavin_state_dict(f"{prefix}{where}.{index}.adapter_{kind}."))
    return lavin


def lavin_arguments(payload):
    """LaVIN's training arguments stored under "args" (argparse.Namespace or dict) as a dict;
    {} when absent."""
    args = payload.get("args") if isinstance(payload, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}
