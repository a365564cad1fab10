"""Checks that `load_adapters` runs on a save_adapters directory before it touches the model.

Everything that can be known from the files alone is checked here: the config is a JSON object
whose "components" name known components, each a valid AdapterConfig (fields spelled as now or,
in files written by older versions, by config.LEGACY_NAMES) plus its hidden_size, and the
weights file holds finite floating-point tensors. Each error is a ValueError naming the file
and the key.
"""
import errno
import json
import os
import re
import stat
import zipfile

import torch

from ..config import LEGACY_NAMES, AdapterConfig

COMPONENTS = ("llama", "clip")
SITE = re.compile(r"^(llama|clip)\.layers\.(\d+)\.(attn|mlp)\.")     # an adapter tensor's name
MAX_CONFIG_BYTES = 1 << 20             # adapter_config.json is about a kilobyte
# Fields every saved record has (compat came later: a record without it means None).
REQUIRED_FIELDS = ("rank", "experts", "groups", "scale", "temperature", "dropout_p", "placement",
                   "hidden_size")
_SPELLING = {new: old for old, new in LEGACY_NAMES.items()}


def require_regular_file(path, what):
    """FileNotFoundError when `path` is missing, ValueError when it is not a regular file (a FIFO,
    a device or a directory would block or misbehave when opened)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {what}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: {what} must be a regular file (this is a FIFO, device or directory)")


def check_tensor_layout(tensor, where, max_numel=None):
    """ValueError unless `tensor` owns every element it claims, before any of its values is read:
    no expanded (stride 0) dimension, no overlapping strides, no more elements than its storage
    holds, and at most `max_numel` elements when given. A file's tensor can claim 1e10 elements
    on a 4-byte storage; an elementwise op on it (torch.isfinite) would allocate the claim."""
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta or tensor.is_nested:
        raise ValueError(f"{where}: a {tensor.layout} tensor ({tensor.dtype}); stored weights must "
                         f"be dense tensors")
    sizes, strides, numel = tuple(tensor.shape), tuple(tensor.stride()), tensor.numel()
    if any(size > 1 and step == 0 for size, step in zip(sizes, strides)):
        raise ValueError(f"{where}: expanded tensor (shape {list(sizes)}, strides {list(strides)}): "
                         f"a stored tensor must own its elements")
    stored = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
    if numel > stored:
        raise ValueError(f"{where}: shape {list(sizes)} claims {numel} elements, its storage holds "
                         f"{stored} (overlapping strides)")
    if max_numel is not None and numel > max_numel:
        raise ValueError(f"{where}: shape {list(sizes)} has {numel} elements, more than the "
                         f"{max_numel} expected")


def check_loaded_tensors(value, where, depth=0):
    """check_tensor_layout on every tensor in a loaded object (dicts, lists, tuples, namespaces)."""
    if depth > 64:
        raise ValueError(f"{where}: nested more than 64 levels deep")
    if isinstance(value, torch.Tensor):
        check_tensor_layout(value, where)
        return
    items = vars(value).items() if hasattr(value, "__dict__") and not isinstance(value, type) else (
        value.items() if isinstance(value, dict) else enumerate(value)
        if isinstance(value, (list, tuple)) else ())
    for key, item in items:
        check_loaded_tensors(item, f"{where}[{key!r}]" if depth < 4 else where, depth + 1)


def check_torch_zip(path, where=None):
    """ValueError unless `path` is a whole torch.save zip file whose records are stored
    uncompressed and add up to no more than the file: then loading it allocates at most its size
    (a compressed record could inflate a few KB into gigabytes; the pre-1.6 format allocates
    each storage at its declared size before reading). Empty and truncated files fail here;
    errors start with `where` (default: the path)."""
    where = where or path
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.fspath(path))
    require_regular_file(path, "checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{where}: empty file (0 bytes), not a torch checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ValueError(f"{where}: not a complete torch.save zip file (truncated, or the pre-1.6 "
                         f"format: re-save it with torch.save) ({error})") from None
    packed = [record.filename for record in records if record.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise ValueError(f"{where}: compressed record {packed[0]!r}: torch.save stores records "
                         f"uncompressed (refused: its inflated size is unbounded)")
    if sum(record.file_size for record in records) > size:
        raise ValueError(f"{where}: records claim more bytes than the file has")


def load_torch_file(path, where=None):
    """torch.load(weights_only=True) on the CPU after check_torch_zip, then check_loaded_tensors:
    a truncated or hostile file is a one-line ValueError naming `where` (default `path`)."""
    check_torch_zip(path, where)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, KeyError, IndexError, TypeError) as error:
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{where or path}: unreadable torch file ({message[:200]})") from None
    check_loaded_tensors(loaded, where or path)
    return loaded


def read_adapter_config(path) -> dict:
    """{component: {"config": AdapterConfig, "hidden_size": int}} of adapter_config.json at
    `path` (ValueError naming the file, component and field for anything invalid)."""
    require_regular_file(path, "adapter config (expected a save_adapters directory)")
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {os.path.getsize(path)} bytes; an adapter config is a few KB "
                         f"(at most {MAX_CONFIG_BYTES} accepted)")
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
    require_regular_file(path, "adapter weights (expected a save_adapters directory)")
    try:
        tensors = load_file(path)
    except Exception as error:       # SafetensorError (truncated, bad header), OSError, ...
        raise ValueError(f"{path}: unreadable safetensors file ({type(error).__name__}: {error})")
    for name, tensor in tensors.items():
        check_tensor_layout(tensor, f"{path}: tensor {name!r}")
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}; adapter weights "
                             f"must be floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {name!r} holds non-finite values (nan or inf)")
    return tensors


def check_component_shapes(config_path, weights_path, name, adapter, tensors):
    """ValueError unless the config's adapter shapes (`adapter`: a meta-device MMAdapter built
    from components[name]) are those of the component's tensors in the weights file. Run before
    anything is allocated from the config: one claiming millions of experts or a huge rank is
    then refused at the cost of the file, not of the claim."""
    expected = {key: tuple(value.shape) for key, value in adapter.state_dict().items()}
    found = 0
    for tensor_name, tensor in tensors.items():
        match = SITE.match(tensor_name)
        if not match or match.group(1) != name:
            continue
        found += 1
        key = tensor_name[match.end():]
        if expected.get(key) != tuple(tensor.shape):
            wanted = list(expected[key]) if key in expected else "no such tensor"
            raise ValueError(f"{weights_path}: tensor {tensor_name!r} has shape {list(tensor.shape)}"
                             f", the adapters of {config_path} components[{name!r}] have {wanted}")
    if not found:
        raise ValueError(f"{config_path}: components[{name!r}]: {weights_path} holds no "
                         f"{name} adapter tensors")


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
