"""Adapter-only checkpoints (safetensors + JSON) and import of LaVIN adapter checkpoints.

    save_adapters(model, "out/")  ->  out/adapter_model.safetensors, out/adapter_config.json
    load_adapters(model, "out/")      # into a patched (or unpatched: patched here) model
    load_lavin_adapters(model, "checkpoint-19.pth")   # LaVIN's training file (lavin_format.py)

Tensor names are the adapters' stable keys ("llama.layers.3.attn.down.weight"), plus
"neck.*" and "modality_embedding.weight" for a LavinModel, so wrapping the model (PEFT,
torch.compile, another container) does not change them. No pickle is loaded unless asked:
safetensors for our format, `torch.load(weights_only=True)` for LaVIN .pth files.
"""
import json
import os

import torch

from .checkpoint_validation import (check_against_model, check_component_shapes, read_adapter_config,
                                    read_adapter_tensors, read_modules_to_save)
from .families import patch as patch_model
from .families import unpatch
from .lavin import LavinModel
from .merge import is_merged
from .patching import adapters, patch_state
from .vlm import (clear_modules_to_save, modality_embedding, modules_to_save, resolve_modules_to_save,
                  set_modules_to_save, vision_language_config)
from .lavin_format import from_lavin_state_dict  # noqa: F401  (public here since 0.1)
from ..modules import MMAdapter
from .lavin_format import lavin_adapter_tensors, lavin_model_dict, lavin_to_ours, read_lavin_file

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def _lavin_module(model):
    return next((module for module in model.modules() if isinstance(module, LavinModel)), None)


def trainable_modules(model):
    """{name prefix: module} of everything an adapter checkpoint holds: the adapters, a
    LavinModel's neck and modality embedding, a vision-language model's modality embedding
    ("llama.modality_embedding") and the modules_to_save ("modules_to_save.<name>")."""
    modules = dict(adapters(model))
    lavin = _lavin_module(model)
    if lavin is not None:
        modules.update(neck=lavin.neck, modality_embedding=lavin.modality_embedding)
    embedding = modality_embedding(model)
    if embedding is not None:
        modules["llama.modality_embedding"] = embedding
    modules.update({f"modules_to_save.{name}": module for name, module in modules_to_save(model).items()})
    return modules


def adapter_state_dict(model):
    """{"llama.layers.0.attn.down.weight": tensor, ...}: adapters (+ neck, modality embedding)."""
    return {f"{prefix}.{name}": tensor for prefix, module in trainable_modules(model).items()
            for name, tensor in module.state_dict().items()}


def adapter_config(model):
    """The JSON-able description save_adapters writes: per component its AdapterConfig's fields
    (compat included: it changes the math) and the model's shapes."""
    import mlan_kernels
    state = patch_state(model) or {}
    config = {"mlan_kernels_version": mlan_kernels.__version__,
              "components": {name: {**record["config"].to_dict(), **record["info"]}
                             for name, record in state.items()}}
    lavin = _lavin_module(model)
    if lavin is not None:
        config["lavin"] = {"neck_hidden": lavin.neck.down.out_features, "clip_every": lavin.clip_every}
    extras = modules_to_save(model)
    if extras:
        config["modules_to_save"] = sorted(extras)
    return config


def save_adapters(model, directory):
    """Write adapter_model.safetensors + adapter_config.json to `directory` (created)."""
    from safetensors.torch import save_file
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in adapter_state_dict(model).items()}
    if not state:
        raise ValueError("model has no adapters to save (patch it first)")
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as handle:
        json.dump(adapter_config(model), handle, indent=2, sort_keys=True)


def _component_root(model, name):
    """The module to patch for component `name` (the LaVIN sub-model, or the model itself)."""
    lavin = _lavin_module(model)
    if lavin is None:
        return model
    return lavin.llama if name == "llama" else lavin.clip


def load_adapters(model, directory, patch=True):
    """Load a save_adapters directory into `model` (bit-exact). A component that is not patched
    yet is patched with the saved hyperparameters when patch=True.

    All or nothing: the files are read and checked first (config fields, finite floating-point
    tensors), then components are patched, then names and shapes are compared; only when all
    of that passes are weights copied. Any failure raises (ValueError naming the file and the
    key, FileNotFoundError) with the model exactly as it was: components patched here are
    unpatched again, and torch's RNG state is left as it was.
    """
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    components = read_adapter_config(config_path)
    tensors = read_adapter_tensors(weights_path)
    if is_merged(model):
        raise ValueError("load_adapters: the model's adapters are merged into its projections; "
                         "call unmerge_adapters(model) first")
    to_patch = {}
    for name, record in components.items():
        config, current = record["config"], patch_state(model, name)
        if current is None:
            if not patch:
                raise ValueError(f"{config_path}: component {name!r} is not patched in the model "
                                 f"(patch it, or pass patch=True)")
            try:          # the checks patching runs, on a meta-device adapter
                adapter = MMAdapter(record["hidden_size"], config, device="meta")
            except ValueError as error:
                raise ValueError(f"{config_path}: components[{name!r}]: {error}") from None
            check_component_shapes(config_path, weights_path, name, adapter, tensors)
            to_patch[name] = config
        elif current["config"] != config:
            raise ValueError(f"{config_path}: {name}: checkpoint adapters {config} do not match "
                             f"the model's {current['config']}")
        _check_hidden_size(config_path, name, record, current)
    extras_missing = not modules_to_save(model)
    patched = []
    try:
        with torch.random.fork_rng():           # fresh adapters are overwritten: keep the RNG
            for name, config in to_patch.items():
                routing = components[name]["modality_routing"] or None
                if vision_language_config(model) is not None and not routing:
                    routing = False
                patch_model(_component_root(model, name), config, component=name, modality_routing=routing)
                patched.append(name)
                _check_hidden_size(config_path, name, components[name], patch_state(model, name))
        if extras_missing:
            set_modules_to_save(model, resolve_modules_to_save(model, read_modules_to_save(config_path)))
        targets = adapter_state_dict(model)
        check_against_model(weights_path, tensors, targets)
    except BaseException:
        for name in reversed(patched):
            unpatch(model, name)
        if extras_missing:
            clear_modules_to_save(model)
        raise
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
    return model


def _check_hidden_size(config_path, name, record, current):
    if current is not None and current["info"]["hidden_size"] != record["hidden_size"]:
        raise ValueError(f"{config_path}: {name}: checkpoint hidden size {record['hidden_size']} "
                         f"!= model hidden size {current['info']['hidden_size']}")


def _names(names, limit=20):
    """A list of names for an error message: the first `limit`, then how many more."""
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... (+{len(names) - limit} more)' if len(names) > limit else ''}]"


def _plan_copy(model, tensors, source):
    """Check {checkpoint name: tensor} against the model's adapter tensors without touching
    them -> ([(target, tensor)], missing, unexpected). Shape mismatches raise (naming `source`);
    the caller decides about missing or unexpected names."""
    targets = adapter_state_dict(model)
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    pairs = []
    for name in sorted(set(targets) & set(tensors)):
        if tuple(targets[name].shape) != tuple(tensors[name].shape):
            raise ValueError(f"{source}: {name}: checkpoint shape {list(tensors[name].shape)} != "
                             f"model shape {list(targets[name].shape)}")
        pairs.append((targets[name], tensors[name]))
    return pairs, missing, unexpected


def load_lavin_adapters(model, checkpoint, weights_only=True, strict=True):
    """Load LaVIN adapter weights into a patched model (a LavinModel for the neck and modality
    embedding), atomically: everything is read and checked before the first tensor changes,
    so a failure leaves the model exactly as it was.

    checkpoint: a path to LaVIN's training file ({"model": ..., "optimizer", "epoch", "scaler",
    "args": argparse.Namespace}, names with or without DDP's "module."), read with
    torch.load(weights_only=True) allowing only argparse.Namespace beyond tensors; or an
    in-memory dict of the same forms. Entries whose name contains "adapter" must be finite
    floating-point tensors. Temperature/scale/dropout stay the model's (LaVIN checkpoints do
    not store them with the weights). Returns (missing, unexpected): our names the file lacks;
    our names the model lacks plus LaVIN adapter names not understood. strict (default) raises
    ValueError listing both when either is non-empty.
    """
    source = "checkpoint dict"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        checkpoint = read_lavin_file(source, weights_only=weights_only)
    tensors = lavin_adapter_tensors(lavin_model_dict(checkpoint, source), source)
    ours, not_understood = lavin_to_ours(tensors, source)
    pairs, missing, unexpected = _plan_copy(model, ours, source=source)
    unexpected = unexpected + not_understood
    if strict and (missing or unexpected):
        raise ValueError(f"{source}: LaVIN checkpoint mismatch: missing {_names(missing)}, "
                         f"unexpected {_names(unexpected)} (strict=False loads the rest)")
    with torch.no_grad():
        for target, tensor in pairs:
            target.copy_(tensor)
    return missing, unexpected

