"""mlan-convert: LaVIN adapter checkpoints <-> ours, tensors unchanged (same values and dtypes).

    mlan-convert lavin-to-hf CKPT OUT_DIR   LaVIN's .pth (its training file, DDP names or not,
                                            or a bare state dict) -> OUT_DIR/adapter_model.safetensors
                                            + adapter_config.json (load_adapters reads them)
    mlan-convert hf-to-lavin OUT_DIR CKPT   save_adapters' directory -> a .pth holding
                                            {"model": {LaVIN name: tensor}, "args": {...}}, which
                                            LaVIN's eval.py and util/misc.py load_model read
Hyperparameters LaVIN does not store with the weights come from the checkpoint's "args"
(train.py's --temperature, --adapter_scale, --adapter_type, --visual_adapter_type), else
LaVIN's defaults; rank, groups and sizes come from the tensor shapes. User errors: one line
`mlan-convert: error: ...`, exit status 2.
"""
import argparse
import json
import math
import os
import pickle
import sys
import tempfile

import torch

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME
from .checkpoint_validation import check_component_shapes, read_adapter_config, read_adapter_tensors
from ..modules import MMAdapter
from ..help_format import DefaultsHelpFormatter
from ..config import AdapterConfig
from .lavin_format import (OUR_SITE, lavin_adapter_tensors, lavin_arguments, lavin_model_dict,
                           lavin_to_ours, ours_to_lavin, read_lavin_file)

MODEL_CLASSES = {"llama": "LlamaForCausalLM", "clip": "CLIPVisionModel"}
LAVIN_DROPOUT = 0.1                             # lavin/mm_adapter.py: nn.Dropout(0.1), fixed
CLIP_EVERY = 4                                  # clip/model.py: CLS after every 4th block


class UserError(Exception):
    """A mistake in the command line or its files: reported as one line, exit status 2."""


def _number(arguments, key, default, source):
    """LaVIN's args.`key` as a float (`default` when absent); UserError for anything else."""
    value = arguments.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{source}: args.{key} must be a finite number, got {value!r:.80} (pass "
                        f"--{key.replace('adapter_', '')} to set it)")
    return float(value)


def _epoch(payload, source):
    """The "epoch" LaVIN stores (an int, or absent) for the converted config."""
    epoch = payload.get("epoch") if "model" in payload else None
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)
                              or not 0 <= epoch < 2**31):
        raise UserError(f"{source}: 'epoch' must be an int in [0, 2^31), got {type(epoch).__name__} "
                        f"{epoch!r:.60}")
    return epoch


def _write_atomically(files):
    """Write {path: callable(temporary path)} to `path`.tmp each, then rename them all; on any
    failure the temporaries are removed and the old files stay."""
    try:
        for path, write in files.items():
            write(path + ".tmp")
        for path in files:
            os.replace(path + ".tmp", path)
    finally:
        for path in files:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")


def _components(ours, arguments, overrides, source):
    """adapter_config.json's "components" for converted tensors {our name: tensor}."""
    sites = {}
    for name, tensor in ours.items():
        match = OUR_SITE.match(name)
        if match:
            sites.setdefault(match.group(1), {}).setdefault(match.groups()[1:], {})[name[match.end():]] = tensor
    temperature = overrides.temperature or _number(arguments, "temperature", 10.0, source)
    scale = overrides.scale or _number(arguments, "adapter_scale", 1.0, source)
    components = {}
    for component, adapters in sorted(sites.items()):
        shapes = {(s["down.weight"].shape[0], s["up.weight"].shape[1], s["up.weight"].shape[2])
                  for s in adapters.values()}
        if len(shapes) != 1:
            raise UserError(f"{source}: {component} adapters differ in shape {sorted(shapes)}")
        (rank, hidden, rank_per_group), = shapes
        config = AdapterConfig(rank=rank, experts=2, groups=rank // rank_per_group, scale=scale,
                               temperature=temperature, dropout_p=overrides.dropout_p,
                               placement="block" if any(kind == "mlp" for _, kind in adapters) else "attn")
        components[component] = {**config.to_dict(), "model_class": MODEL_CLASSES[component],
                                  "hidden_size": hidden,
                                  "num_layers": 1 + max(int(index) for index, _ in adapters)}
    return components


def lavin_to_hf(checkpoint, out_dir, options):
    """Convert LaVIN's file `checkpoint` into our directory `out_dir` (see the module doc)."""
    from safetensors.torch import save_file
    payload = read_lavin_file(checkpoint, weights_only=not options.trust_pickle)
    tensors = lavin_adapter_tensors(lavin_model_dict(payload, checkpoint), checkpoint)
    ours, unknown = lavin_to_ours(tensors, checkpoint)
    if unknown:
        raise UserError(f"{checkpoint}: LaVIN names not understood: {unknown[:10]}")
    if not ours:
        raise UserError(f"{checkpoint}: holds no LaVIN adapter tensors")
    config = {"components": _components(ours, lavin_arguments(payload), options, checkpoint),
              "converted_from": {"format": "lavin", "file": os.path.basename(checkpoint),
                                 "epoch": _epoch(payload, checkpoint)}}
    if "neck.down.weight" in ours:
        config["lavin"] = {"neck_hidden": ours["neck.down.weight"].shape[0], "clip_every": CLIP_EVERY}
    text = json.dumps(config, indent=2, sort_keys=True)          # before any file is written
    weights, config_path = (os.path.join(out_dir, name) for name in (WEIGHTS_NAME, CONFIG_NAME))
    _refuse_existing([weights, config_path], options.overwrite)
    os.makedirs(out_dir, exist_ok=True)

    def write_config(path):
        with open(path, "w") as handle:
            handle.write(text)
    _write_atomically({weights: lambda path: save_file(
        {name: tensor.contiguous() for name, tensor in ours.items()}, path, metadata={"format": "pt"}),
        config_path: write_config})
    return len(ours)


def hf_to_lavin(directory, checkpoint, options):
    """Convert our directory into LaVIN's .pth `checkpoint` (see the module doc). The directory
    is read as load_adapters reads it (config fields, finite tensors that own their elements,
    shapes that match the config) before anything is written."""
    config_path, weights_path = (os.path.join(directory, name) for name in (CONFIG_NAME, WEIGHTS_NAME))
    for path in (weights_path, config_path):
        if not os.path.isfile(path):
            raise UserError(f"{directory}: no {os.path.basename(path)} (expected save_adapters' output)")
    components = read_adapter_config(config_path)
    tensors = read_adapter_tensors(weights_path)
    for component, record in components.items():
        if record["config"].experts != 2:
            raise UserError(f"{config_path}: components[{component!r}] has {record['config'].experts} "
                            f"experts; LaVIN's adapters have 2")
        adapter = MMAdapter(record["hidden_size"], record["config"], device="meta")
        check_component_shapes(config_path, weights_path, component, adapter, tensors)
    lavin_section = _lavin_section(config_path)
    try:
        lavin = ours_to_lavin(tensors, prefix="module." if options.ddp_prefix else "")
    except (KeyError, ValueError, RuntimeError) as error:
        raise UserError(f"{directory}: {str(error).splitlines()[0]}") from None
    llama, clip = (components[name]["config"] if name in components else None for name in ("llama", "clip"))
    first = llama or clip
    arguments = {"adapter_dim": first.rank, "adapter_scale": first.scale,
                 "temperature": first.temperature,
                 "adapter_type": llama.placement if llama else "attn",
                 "visual_adapter_type": "router_block" if clip and clip.placement == "block" else "router",
                 "hidden_proj": lavin_section.get("neck_hidden")}
    _refuse_existing([checkpoint], options.overwrite)
    _require_writable_parent(checkpoint)
    _write_atomically({checkpoint: lambda path: torch.save({"model": lavin, "args": arguments}, path)})
    return len(lavin)


def _lavin_section(config_path) -> dict:
    """adapter_config.json's optional "lavin" object ({"neck_hidden": int, ...}); UserError for
    anything else."""
    with open(config_path, encoding="utf-8") as handle:
        section = json.load(handle).get("lavin", {})
    hidden = section.get("neck_hidden") if isinstance(section, dict) else None
    if not isinstance(section, dict) or (hidden is not None and (
            isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1)):
        raise UserError(f"{config_path}: 'lavin' must be an object with a positive int "
                        f"'neck_hidden', got {section!r:.80}")
    return section


def _require_writable_parent(path):
    """UserError unless a file can be created next to `path` (tried: read-only file systems and
    permissions count, also for root)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        raise UserError(f"{path}: directory {parent} does not exist")
    if not os.path.isdir(parent):
        raise UserError(f"{path}: {parent} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise UserError(f"{path}: directory {parent} is not writable ({error.strerror})") from None


def _refuse_existing(paths, overwrite):
    existing = [path for path in paths if os.path.exists(path)]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists (pass --overwrite to replace it)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `mlan-convert: error: ...`, exit 2."""

    def error(self, message):
        sys.stderr.write(f"mlan-convert: error: {message}\n")
        sys.exit(2)


def build_parser():
    parser = _Parser(prog="mlan-convert", description=__doc__.split("\n")[0],
                     formatter_class=DefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    to_hf = commands.add_parser("lavin-to-hf", help="LaVIN .pth -> adapter_model.safetensors + "
                                "adapter_config.json", formatter_class=DefaultsHelpFormatter)
    to_hf.add_argument("checkpoint", metavar="CKPT", help="LaVIN checkpoint (.pth)")
    to_hf.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created)")
    to_hf.add_argument("--temperature", type=float, default=None,
                       help="router temperature (default: the checkpoint's args.temperature, else 10.0)")
    to_hf.add_argument("--scale", type=float, default=None,
                       help="adapter scale (default: the checkpoint's args.adapter_scale, else 1.0)")
    to_hf.add_argument("--dropout", dest="dropout_p", metavar="P", type=float, default=LAVIN_DROPOUT,
                       help="adapter dropout probability (AdapterConfig.dropout_p) recorded in "
                            "the config (LaVIN's is fixed)")
    to_hf.add_argument("--trust-pickle", action="store_true",
                       help="read CKPT with torch.load(weights_only=False): runs code from the file")
    to_lavin = commands.add_parser("hf-to-lavin", help="our adapter directory -> LaVIN .pth",
                                   formatter_class=DefaultsHelpFormatter)
    to_lavin.add_argument("directory", metavar="OUT_DIR", help="save_adapters' directory")
    to_lavin.add_argument("checkpoint", metavar="CKPT", help="LaVIN checkpoint to write (.pth)")
    to_lavin.add_argument("--ddp-prefix", action="store_true",
                          help="prefix names with DDP's 'module.' (as LaVIN's torchrun training saves)")
    for command in (to_hf, to_lavin):
        command.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def main(argv=None):
    options = build_parser().parse_args(argv)
    if options.command == "lavin-to-hf":
        for name in ("temperature", "scale"):
            value = getattr(options, name)
            if value is not None and not (value > 0 and value != float("inf")):
                build_parser().error(f"--{name} must be a finite number > 0, got {value}")
        if not 0.0 <= options.dropout_p < 1.0:
            build_parser().error(f"--dropout must be in [0, 1), got {options.dropout_p}")
    try:
        if options.command == "lavin-to-hf":
            count = lavin_to_hf(options.checkpoint, options.out_dir, options)
            print(f"wrote {count} tensors to {options.out_dir}")
        else:
            count = hf_to_lavin(options.directory, options.checkpoint, options)
            print(f"wrote {count} tensors to {options.checkpoint}")
    except (UserError, ValueError, OSError, pickle.UnpicklingError, json.JSONDecodeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        sys.stderr.write(f"mlan-convert: error: {message}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
