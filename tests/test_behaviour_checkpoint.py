"""What users rely on in adapter checkpoints (mlan_kernels/integrations/checkpoint.py).

* save_adapters writes a PyTorch safetensors file (metadata format "pt", what Hugging Face's
  loaders check) and a config that describes the model, the LaVIN assembly included.
* load_adapters restores a model exactly, also into a LaVIN assembly one of whose components
  was unpatched, and leaves torch's RNG as it was (fresh adapters are overwritten anyway).
* Every error says what is wrong in one message that starts with the file (or "checkpoint
  dict") and names the key; asserted whole (`^...$`), so a changed word fails.
* A LaVIN mismatch lists at most 20 names per side, then how many more.
"""
import json
import re

import pytest
import torch

from mlan_kernels.integrations.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict,
                                     load_adapters, load_lavin_adapters, save_adapters)
from mlan_kernels.config import AdapterConfig
from mlan_kernels.integrations import merge_adapters, patch_llama, unpatch
from mlan_kernels.integrations.patching import patch_state
from mlan_kernels.integrations.tiny import tiny_llama

from test_behaviour_lavin import lavin_names
from test_integration_lavin import HAS_IMAGE, PIXELS, tiny_lavin
from test_integration_llama import randomize_adapters, token_ids


def whole(text):
    """A regex matching exactly `text`."""
    return f"^{re.escape(text)}$"


def saved_llama(directory, **kwargs):
    model = randomize_adapters(patch_llama(tiny_llama(layers=2), **kwargs))
    save_adapters(model, directory)
    return model


def test_saving_a_model_without_adapters_says_to_patch_it(tmp_path):
    with pytest.raises(ValueError, match=whole("model has no adapters to save (patch it first)")):
        save_adapters(tiny_llama(layers=2), tmp_path)


def test_the_weights_file_is_a_pytorch_safetensors_file(tmp_path):
    from safetensors import safe_open
    model = saved_llama(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert set(handle.keys()) == set(adapter_state_dict(model))


def test_the_config_describes_the_lavin_assembly(tmp_path):
    model = tiny_lavin(clip_every=4)
    save_adapters(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["lavin"] == {"neck_hidden": 16, "clip_every": 4}
    assert sorted(config["components"]) == ["clip", "llama"]
    assert config["components"]["clip"]["hidden_size"] == model.clip.config.hidden_size


def test_a_lavin_component_unpatched_before_loading_is_patched_into_that_component(tmp_path):
    model = tiny_lavin()
    save_adapters(model, tmp_path)
    for component in ("clip", "llama"):
        fresh = tiny_lavin()
        unpatch(fresh, component)
        assert patch_state(fresh, component) is None
        load_adapters(fresh, tmp_path)
        assert patch_state(fresh, component)["config"] == patch_state(model, component)["config"]
        ids = token_ids(batch=3, length=5)
        assert torch.equal(fresh(ids, PIXELS, HAS_IMAGE).logits, model(ids, PIXELS, HAS_IMAGE).logits)


def test_loading_into_an_unpatched_model_leaves_torchs_rng_as_it_was(tmp_path):
    saved_llama(tmp_path)
    model = tiny_llama(layers=2, seed=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    load_adapters(model, tmp_path)
    assert patch_state(model, "llama") is not None
    assert torch.equal(torch.get_rng_state(), before)


def test_load_adapters_errors_name_the_file_and_the_key(tmp_path):
    saved_llama(tmp_path)
    config_path = str(tmp_path / CONFIG_NAME)
    with pytest.raises(ValueError, match=whole(
            f"{config_path}: component 'llama' is not patched in the model "
            f"(patch it, or pass patch=True)")):
        load_adapters(tiny_llama(layers=2), tmp_path, patch=False)

    other = patch_llama(tiny_llama(layers=2), rank=4)
    saved = AdapterConfig.from_dict(json.loads((tmp_path / CONFIG_NAME).read_text())["components"]["llama"])
    with pytest.raises(ValueError, match=whole(
            f"{config_path}: llama: checkpoint adapters {saved} do not match the model's "
            f"{patch_state(other, 'llama')['config']}")):
        load_adapters(other, tmp_path)

    for patched in (False, True):       # checked after patching here, or before anything
        wider = tiny_llama(layers=2, hidden_size=64)
        if patched:
            patch_llama(wider)
        with pytest.raises(ValueError, match=whole(
                f"{config_path}: llama: checkpoint hidden size 32 != model hidden size 64")):
            load_adapters(wider, tmp_path)
        assert (patch_state(wider, "llama") is not None) == patched    # unpatched again


def test_a_config_the_adapter_cannot_have_names_the_component(tmp_path):
    """Checked with the saved hyperparameters (groups 4, not the default 2), before patching."""
    saved_llama(tmp_path, groups=4)
    config_path = tmp_path / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["components"]["llama"]["hidden_size"] = 34
    config_path.write_text(json.dumps(config))
    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match=whole(
            f"{config_path}: components['llama']: groups 4 must divide dim 34")):
        load_adapters(model, tmp_path)
    assert patch_state(model) is None


def test_loading_into_merged_adapters_says_to_unmerge_first(tmp_path):
    saved_llama(tmp_path)
    model = randomize_adapters(patch_llama(tiny_llama(layers=2, seed=1)))
    merge_adapters(model, torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match=whole(
            "load_adapters: the model's adapters are merged into its projections; "
            "call unmerge_adapters(model) first")):
        load_adapters(model, tmp_path)


def extras(count):
    """`count` LaVIN-looking names that no adapter pattern understands (all unexpected)."""
    return {f"extra_adapter_{index:02d}.weight": torch.zeros(2) for index in range(count)}


@pytest.mark.parametrize("count", [1, 20, 21, 25])
def test_a_lavin_mismatch_lists_twenty_names_then_how_many_more(count):
    source, target = tiny_lavin(), tiny_lavin()
    checkpoint = {**lavin_names(source, "backbone.visual.transformer"), **extras(count)}
    names = sorted(extras(count))
    listed = ", ".join(names[:20]) + (f", ... (+{count - 20} more)" if count > 20 else "")
    before = {name: tensor.clone() for name, tensor in adapter_state_dict(target).items()}
    with pytest.raises(ValueError, match=whole(
            f"checkpoint dict: LaVIN checkpoint mismatch: missing [], unexpected [{listed}] "
            f"(strict=False loads the rest)")):
        load_lavin_adapters(target, checkpoint)
    after = adapter_state_dict(target)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert load_lavin_adapters(target, checkpoint, strict=False) == ([], names)


def test_a_lavin_mismatch_names_the_missing_and_the_file(tmp_path):
    source, target = tiny_lavin(), tiny_lavin()
    checkpoint = lavin_names(source, "backbone.visual.transformer")
    del checkpoint["adapter_proj.conv_B.bias"], checkpoint["adapter_modality_embedding.weight"]
    path = tmp_path / "checkpoint-19.pth"
    torch.save({"model": {**checkpoint, **extras(1)}}, path)
    with pytest.raises(ValueError, match=whole(
            f"{path}: LaVIN checkpoint mismatch: missing [modality_embedding.weight, neck.up.bias], "
            f"unexpected [extra_adapter_00.weight] (strict=False loads the rest)")):
        load_lavin_adapters(target, path)


def test_a_lavin_tensor_of_the_wrong_shape_names_the_file_and_the_key(tmp_path):
    source, target = tiny_lavin(), tiny_lavin()
    checkpoint = lavin_names(source, "backbone.visual.transformer")
    checkpoint["adapter_proj.conv_A.weight"] = torch.zeros(3, 4)
    shape = list(target.neck.down.weight.shape)
    before = {name: tensor.clone() for name, tensor in adapter_state_dict(target).items()}
    for strict in (True, False):
        with pytest.raises(ValueError, match=whole(
                f"checkpoint dict: neck.down.weight: checkpoint shape [3, 4] != model shape {shape}")):
            load_lavin_adapters(target, checkpoint, strict=strict)
    after = adapter_state_dict(target)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_a_failed_load_unpatches_only_what_it_patched(tmp_path):
    """LaVIN with CLIP unpatched: the load patches CLIP, then the weights file lacks one of its
    tensors; CLIP is unpatched again, the LLaMA adapters that were there stay, and the error
    names the weights file and the tensor. (A tensor of the wrong shape is refused before
    patching: tests/test_hostile_checkpoints.py.)"""
    from safetensors.torch import load_file, save_file
    save_adapters(tiny_lavin(), tmp_path)
    weights_path = tmp_path / WEIGHTS_NAME
    tensors = load_file(weights_path)
    name = "clip.layers.0.attn.down.weight"
    del tensors[name]
    save_file(tensors, weights_path)
    model = tiny_lavin()
    unpatch(model, "clip")
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=whole(
            f"{weights_path}: adapter tensors do not match the model: missing [{name!r}], "
            f"unexpected []")):
        load_adapters(model, tmp_path)
    assert patch_state(model, "clip") is None and patch_state(model, "llama") is not None
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
