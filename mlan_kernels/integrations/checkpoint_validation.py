"""Checks that `load_adapters` runs on a save_adapters directory before it touches the model.

Everything that can be known from the files alone is checked here: the config is a JSON object
whose "components" name known components, each a valid AdapterConfig (fields spelled as now or,
in files written by older versions, by config.LEGACY_NAMES) plus its hidden_size, and the
weights file holds finite floating-point tensors. Each error is a ValueError naming the file
and the key.
"""
import json
import os

import torch

from ..config import LEGACY_NAMES, AdapterConfig

COMPONENTS = ("llama", "clip")
# Fields every saved record has (compat came later: a record without it means None).
REQUIRED_FIELDS = ("rank", "experts", "groups", "scale", "temperature", "dropout_p", "placement",
                   "hidden_size")
_SPELLING = {new: old for old, new in LEGACY_NAMES.items()}


def read_adapter_config(path) -> dict:
    """{component: {"config": AdapterConfig, "hidden_size": int}} of adapter_config.json at
    `path` (ValueError naming the file, component and field for anything invalid)."""
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no adapter config (expected a save_adapters directory)")
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path}: not a JSON adapter config ({type(error).__name__}: {error})")
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(saved).__name__}")
    components = saved.get("components")
    if not isinstance(components, dict) or not components:
        raise ValueError(f"{path}: key 'components' must be a non-empty object "
                         f"{{component: hyperparameters}}, got {components!r:.80}")
    for name, record in list(components.items()):
        where = f"{path}: components[{name!r}]"
        if name not in COMPONENTS:
            raise ValueError(f"{where}: unknown component; expected one of {list(COMPONENTS)}")
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        missing = [key for key in REQUIRED_FIELDS if key not in record and _SPELLING.get(key) not in record]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        hidden_size = record["hidden_size"]
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"{where}['hidden_size']: expected a positive int, got {hidden_size!r}")
        modality_routing = record.get("modality_routing", False)
        if not isinstance(modality_routing, bool):
            raise ValueError(f"{where}['modality_routing']: expected true or false, got {modality_routing!r}")
        try:
            config = AdapterConfig.from_dict(record)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
        components[name] = {"config": config, "hidden_size": hidden_size, "modality_routing": modality_routing}
    return components


def read_modules_to_save(path) -> list:
    """The "modules_to_save" names of a valid adapter_config.json at `path` ([] when absent)."""
    with open(path, encoding="utf-8") as handle:
        names = json.load(handle).get("modules_to_save", [])
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{path}: 'modules_to_save' must be a list of module names, got {names!r:.80}")
    return names


def read_adapter_tensors(path) -> dict:
    """{name: tensor} of adapter_model.safetensors at `path`; every tensor floating and finite."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no adapter weights (expected a save_adapters directory)")
    try:
        tensors = load_file(path)
    except Exception as error:       # SafetensorError (truncated, bad header), OSError, ...
        raise ValueError(f"{path}: unreadable safetensors file ({type(error).__name__}: {error})")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}; adapter weights "
                             f"must be floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {name!r} holds non-finite values (nan or inf)")
    return tensors


def check_against_model(path, tensors: dict, targets: dict):
    """ValueError unless `tensors` has exactly the names and shapes of `targets` (the model's
    adapter_state_dict)."""
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter tensors do not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for name, tensor in tensors.items():
        if tuple(targets[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {list(tensor.shape)}, the "
                             f"model's is {list(targets[name].shape)}")
