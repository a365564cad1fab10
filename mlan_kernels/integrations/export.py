"""Export for serving: a patched model, its adapters merged for one modality, as a plain HF checkpoint.

`export_merged(model, out_dir, modality)` folds every MM-Adapter into the linears that read it
(merge.py: W' = W (I + U W_A), b' = b + W (U b_A + c), with U and c taken at the modality's
routing weights), writes the result as the checkpoint of the model's own class and config, and
unmerges: the user's model is left exactly as it was. The checkpoint is what stock
`from_pretrained` reads with no mlan_kernels installed. The fold adds a bias to every consumer,
so the written config declares it (`attention_bias=True`; `mlp_bias=True` for "block");
the switch also gives the other projection of that block (o_proj, down_proj) a bias, written as
zeros. Families whose projections cannot take a bias are refused (BIAS_SWITCHES).

What gets written (docs/export.md):
    a patched decoder          out_dir/  config.json, model.safetensors, ..., mlan_export.json
    a patched vision tower     out_dir/  (same, e.g. a CLIPVisionModel)
    a LavinModel               out_dir/llama/  the decoder, merged for `modality`
                               out_dir/clip/   the vision tower ("image" only)
                               out_dir/lavin_neck.safetensors, README.md ("image" only)
                               out_dir/mlan_export.json

Routing weights (routing_weights_for, the one place that decides them):
    LavinModel       the LLaMA adapters: the modality token's (LavinModel.modality_routing_weights);
                     the vision adapters ("image"): recorded on calibration `pixel_values`
    a decoder        recorded on a one-token input holding the BOS id: every adapter routes by
                     position 0's hidden state, and under causal attention position 0 of any
                     input that starts with BOS has that same state, so the merged model equals
                     the adapted one on every input that starts with BOS
    a vision tower   recorded on calibration `pixel_values`, averaged over the images: the
                     router reads the image's own CLS token, so the merged tower equals the
                     adapted one only on images that route like the calibration (one image:
                     exactly that image)
"""
import contextlib
import copy
import json
import os
import shutil
import tempfile

import torch

from .families import family_of
from .merge import is_merged, merge_adapters, unmerge_adapters
from .patching import AdaptedNorm, adapted_norms, patch_state, record_routing_weights
from .vlm import (MODALITY_ATTRIBUTE, modality_embedding, modality_routing_weights, vision_language_config,
                  vision_language_parts)

# model_type -> {site name: the config switch that gives the consumers a bias, or ALWAYS when
# they have one anyway}; a site not listed cannot hold the merged bias.
ALWAYS = None
_UNSET = object()
BIAS_SWITCHES = {
    "llama": {"attn": "attention_bias", "mlp": "mlp_bias"},
    "qwen2": {"attn": ALWAYS},
    "qwen3": {"attn": "attention_bias"},
    "gemma": {"attn": "attention_bias"},
    "gemma2": {"attn": "attention_bias"},
    "gemma3_text": {"attn": "attention_bias"},
    "clip_vision_model": {"attn": ALWAYS, "mlp": ALWAYS},
    "siglip_vision_model": {"attn": ALWAYS, "mlp": ALWAYS},
}
EXPORT_RECORD = "mlan_export.json"
NECK_FILE = "lavin_neck.safetensors"


def _is_lavin(model):
    from .lavin import LavinModel   # lavin imports the integrations this module builds on
    return isinstance(model, LavinModel)


@contextlib.contextmanager
def _state_kept(model):
    """Eval mode inside (dropout off while routing is recorded); every module's training flag and
    every adapter's routing cache and phase as they were on exit."""
    training = [(module, module.training) for module in model.modules()]
    routing = [(norm, norm.cached_routing_weights, norm.phase) for norm in adapted_norms(model)]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in training:
            module.training = flag
        for norm, cached, phase in routing:
            norm.cached_routing_weights, norm.phase = cached, phase


def _check_modality(modality, accepted, what):
    if modality not in accepted:
        raise ValueError(f"modality must be one of {list(accepted)} for {what}, got {modality!r}")


@torch.no_grad()
def _vision_routing_weights(tower, pixel_values):
    """{key: [E]}: the vision adapters' routing weights on `pixel_values` [N, 3, H, W], averaged
    over the N images."""
    if pixel_values is None:
        raise ValueError("pixel_values is required to export a vision tower: its adapters route by "
                         "each image's own token; pass calibration images [N, 3, H, W] (or weights=)")
    if any(norm.sequence_first for norm in adapted_norms(tower)):
        raise ValueError('compat="lavin" vision adapters route every token position by its own '
                         'weights; one merged tower cannot hold them (export the "text" modality, '
                         'or rebuild with compat=None)')
    with record_routing_weights(tower) as recorder:
        tower(pixel_values=pixel_values)
    return {key: value.mean(0) for key, value in recorder.weights.items()}


@torch.no_grad()
def routing_weights_for(model, modality, *, bos_token_id=None, pixel_values=None) -> dict:
    """{adapter key: [E]} routing weights that merge `model`'s adapters for `modality` (module
    docstring: a LavinModel by its modality token, a decoder by its BOS token, a vision tower by
    calibration images). Leaves the model's modes and routing caches as they were."""
    with _state_kept(model):
        if _is_lavin(model):
            from .lavin import MODALITIES
            _check_modality(modality, MODALITIES, "a LavinModel")
            weights = {key: value[0] for key, value in model.modality_routing_weights(modality).items()}
            if modality == "image":
                weights.update(_vision_routing_weights(model.clip, pixel_values))
            return weights
        if vision_language_config(model) is not None:
            return _vision_language_routing_weights(model, modality, pixel_values)
        component = family_of(model).component
        if component == "clip":
            _check_modality(modality, ("image",), f"a vision tower ({type(model).__name__})")
            return _vision_routing_weights(model, pixel_values)
        _check_modality(modality, ("text",), f"a decoder routed by its BOS token ({type(model).__name__}; "
                                             f"pass weights= for another routing)")
        bos = model.config.bos_token_id if bos_token_id is None else bos_token_id
        if not isinstance(bos, int) or isinstance(bos, bool):
            raise ValueError(f"bos_token_id must be an int (the token every input starts with), got {bos!r} "
                             f"(config.bos_token_id is {model.config.bos_token_id!r})")
        device = model.get_input_embeddings().weight.device
        with record_routing_weights(model) as recorder:
            model(input_ids=torch.tensor([[bos]], device=device), use_cache=False)
        return {key: value[0] for key, value in recorder.weights.items()}


def _vision_language_routing_weights(model, modality, pixel_values):
    """A whole vision-language model: the language adapters by the modality embedding (what every
    sample of that modality routes with), the vision adapters on calibration images."""
    if modality_embedding(model) is None:
        raise ValueError(f"{type(model).__name__}: its language adapters route without the modality "
                         f"signal (patched with modality_routing=False); pass weights=")
    weights = {key: value[0] for key, value in modality_routing_weights(model, modality).items()}
    if any(key.startswith("clip.") for key in adapted_keys(model)):
        weights.update(_vision_routing_weights(vision_language_parts(model)["clip"], pixel_values))
    return weights


def adapted_keys(model):
    return [norm.key for norm in adapted_norms(model)]


def _bias_switches(model):
    """[(config to update, {site: switch}, component)] of `model`: its own config, or a
    vision-language model's text_config ("llama" adapters) and vision_config ("clip")."""
    config = vision_language_config(model)
    if config is None:
        return [(model.config, BIAS_SWITCHES.get(model.config.model_type, {}), None)]
    return [(config.text_config, BIAS_SWITCHES.get(config.text_config.model_type, {}), "llama"),
            (config.vision_config, BIAS_SWITCHES.get(config.vision_config.model_type, {}), "clip")]


def _check_exportable(model):
    """ValueError unless `model` is a patched HF model whose family can declare the merged biases;
    returns (model_type, {config switch: True}) for the written config."""
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")) or hasattr(model, "peft_config"):
        raise TypeError(f"model must be a transformers PreTrainedModel (merge a PEFT model with "
                        f"merge_and_unload first), got {type(model).__name__}")
    kind = model.config.model_type
    state = patch_state(model) or {}
    if not state:
        raise ValueError(f"{type(model).__name__} has no MM-Adapters; save it with save_pretrained")
    if vision_language_config(model) is None:
        family_of(model)                                    # a supported model type
    config_updates = []                                     # [(config, switch)]
    for config, switches, component in _bias_switches(model):
        sites = [site for name, record in state.items() if component in (None, name) for site in record["sites"]]
        for site in sites:
            if site.name not in switches:
                raise ValueError(f"model_type {config.model_type!r} cannot be exported merged: the merge adds a "
                                 f"bias to {', '.join(site.consumers)} ({site.name!r} adapters) and "
                                 f"transformers' {config.model_type} declares no bias there")
            if switches[site.name] is not ALWAYS:
                config_updates.append((config, switches[site.name]))
    return kind, config_updates


def _plain_model(model, config_updates):
    """A stock instance of type(model) for the updated config holding the merged weights
    (shared, not copied): built on the meta device, then loaded strictly with assign=True; the
    biases the new switches add beyond the merged ones (o_proj, down_proj) are zeros."""
    originals = [(config, name, config.__dict__.get(name, _UNSET)) for config, name in config_updates]
    try:
        for config, name in config_updates:
            setattr(config, name, True)
        config = copy.deepcopy(model.config)
    finally:
        for sub_config, name, value in originals:
            if value is _UNSET:
                delattr(sub_config, name)
            else:
                setattr(sub_config, name, value)
    state = {name: value for name, value in model.state_dict().items() if MODALITY_ATTRIBUTE not in name}
    with torch.device("meta"):
        plain = type(model)(config)
    for name, parameter in plain.state_dict().items():
        weight = state.get(name[:-len("bias")] + "weight")
        if name not in state and name.endswith(".bias") and weight is not None:
            state[name] = torch.zeros(parameter.shape, dtype=weight.dtype, device=weight.device)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    return plain.eval()


def _write_merged(model, directory, weights):
    """Merge `model`'s adapters with `weights`, write it as a stock checkpoint into `directory`,
    unmerge (also on failure)."""
    kind, config_updates = _check_exportable(model)
    merge_adapters(model, weights)
    try:
        if any(isinstance(module, AdaptedNorm) for module in model.modules()):
            raise RuntimeError(f"{type(model).__name__}: an adapter stayed unmerged")
        _plain_model(model, config_updates).save_pretrained(directory)
    finally:
        unmerge_adapters(model)
    return {"model_type": kind, "config": {f"{config.model_type}.{name}": True for config, name in config_updates}}


def _write_neck(lavin, directory, modality):
    """The LavinModel parts that are not HF modules: the neck and the modality token."""
    from safetensors.torch import save_file
    from .lavin import MODALITIES
    tensors = {f"neck.{name}": value.detach().contiguous().cpu() for name, value in lavin.neck.state_dict().items()}
    tensors["modality_token"] = lavin.modality_embedding.weight[MODALITIES[modality]].detach().contiguous().cpu()
    save_file(tensors, os.path.join(directory, NECK_FILE),
              metadata={"clip_every": str(lavin.clip_every), "image_summary": lavin.image_summary})
    with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as handle:
        summary = {"first": "CLS hidden state", "mean": "mean patch hidden state"}[lavin.image_summary]
        handle.write(LAVIN_README.format(clip_every=lavin.clip_every, neck=NECK_FILE, summary=summary))


LAVIN_README = """# LaVIN export, image modality

llama/ and clip/ are stock transformers checkpoints (adapters merged). The image tokens come from
two small parts that are not transformers modules, in {neck}:
  neck.down.weight/bias, neck.up.weight/bias   image_tokens = up(silu(down(summary)))
  modality_token                               not needed: its only effect, the routing, is merged
summary = the vision tower's {summary} after every {clip_every}-th block (hidden_states[{clip_every}], ...).
Feed the decoder inputs_embeds = [image tokens | embedded text] (default position ids).
"""


def export_merged(model, out_dir, modality="text", weights=None, *, bos_token_id=None,
                  pixel_values=None, overwrite=False) -> dict:
    """Write `model` with its adapters merged for `modality` as a checkpoint stock transformers
    loads (module docstring); returns what was written ({"modality", "parts": {...}}).

    model: a patched HF decoder or vision tower, or a LavinModel. modality: "text" | "image".
    weights: routing weights ({adapter key: [E]} or one [E] for all); default
    routing_weights_for(model, modality, bos_token_id=..., pixel_values=...).
    The write is atomic (a temporary directory renamed into place: a failure leaves no
    out_dir); an existing out_dir is refused unless overwrite=True. The model is left as it was
    (weights bit-exact, modes, routing caches).
    """
    if modality not in ("text", "image"):
        raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
    if is_merged(model):
        raise ValueError("model has merged adapters; call unmerge_adapters(model) before export_merged")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"out_dir {out_dir} exists; pass a new directory or overwrite=True")
    lavin = _is_lavin(model)
    parts = ({"llama": model.llama} | ({"clip": model.clip} if modality == "image" else {})) if lavin \
        else {".": model}
    for part in parts.values():
        _check_exportable(part)
    source = "explicit" if weights is not None else _routing_source(model, lavin, modality, bos_token_id, pixel_values)
    if weights is None:
        weights = routing_weights_for(model, modality, bos_token_id=bos_token_id, pixel_values=pixel_values)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        record = {"modality": modality, "routing": source, "parts": {}}
        for name, part in parts.items():
            record["parts"][name] = _write_merged(part, os.path.join(scratch, name), weights)
        if lavin and modality == "image":
            _write_neck(model, scratch, modality)
        with open(os.path.join(scratch, EXPORT_RECORD), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
        _move_into_place(scratch, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return record


def _routing_source(model, lavin, modality, bos_token_id, pixel_values) -> str:
    """How routing_weights_for derives the weights, in words (for mlan_export.json)."""
    images = f"{0 if pixel_values is None else len(pixel_values)} calibration image(s)"
    if lavin:
        return "modality token" + (f"; vision tower: {images}" if modality == "image" else "")
    if vision_language_config(model) is not None:
        return f"modality embedding; vision tower: {images}"
    if family_of(model).component == "clip":
        return images
    return f"BOS token {model.config.bos_token_id if bos_token_id is None else bos_token_id}"


def _move_into_place(scratch, out_dir):
    """Rename `scratch` to `out_dir`; an existing out_dir is replaced only once the new one is
    complete (renamed aside first, removed after)."""
    aside = None
    if os.path.exists(out_dir):
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old.", dir=os.path.dirname(out_dir))
        os.rmdir(aside)
        os.rename(out_dir, aside)
    try:
        os.rename(scratch, out_dir)
    except OSError:
        if aside is not None:
            os.rename(aside, out_dir)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
