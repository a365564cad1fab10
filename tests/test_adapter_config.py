"""AdapterConfig, the one carrier of the adapter settings: what every entry point takes, how
keyword shortcuts map onto it, adapter_config.json written by older versions (field "dropout",
no "compat"), the compat mode's save/load round trip, and the training program's flags."""
import dataclasses
import json

import pytest
import torch

from mlan_kernels import AdapterConfig, MMAdapter
from mlan_kernels.integrations.checkpoint import CONFIG_NAME, load_adapters, save_adapters
from mlan_kernels.integrations import patch_clip_vision, patch_llama, patch_state
from mlan_kernels.integrations.lavin import build_lavin
from mlan_kernels.integrations.patching import adapted_norms
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama
from mlan_train.config import (ADAPTER_FLAGS, TrainConfig, build_parser,
                                                config_from_args, options_dict)

from test_integration_lavin import HAS_IMAGE, PIXELS
from test_integration_llama import randomize_adapters, token_ids

CONFIG = AdapterConfig(rank=4, experts=3, groups=2, scale=0.5, temperature=5.0, dropout_p=0.0,
                       placement="block")
PREFIXES = dict(image_prefix_ids=[11, 12], text_prefix_ids=[11, 12, 13])


def test_fields_are_the_op_argument_names():
    assert AdapterConfig.field_names() == ("rank", "experts", "groups", "scale", "temperature",
                                           "dropout_p", "placement", "compat")


def test_keyword_shortcuts_build_the_same_config_everywhere():
    by_keyword = MMAdapter(16, **CONFIG.to_dict())
    assert by_keyword.config == CONFIG == MMAdapter(16, CONFIG).config
    assert (by_keyword.rank, by_keyword.experts, by_keyword.dropout_p) == (4, 3, 0.0)
    for patcher, make in ((patch_llama, tiny_llama), (patch_clip_vision, tiny_clip)):
        component = "llama" if patcher is patch_llama else "clip"
        assert patch_state(patcher(make(), CONFIG), component)["config"] == CONFIG
        assert patch_state(patcher(make(), **CONFIG.to_dict()), component)["config"] == CONFIG
    model = build_lavin(tiny_llama(), tiny_clip(), neck_hidden=8, **CONFIG.to_dict())
    assert patch_state(model.llama, "llama")["config"] == CONFIG


@pytest.mark.parametrize("call, error, message", [
    (lambda: MMAdapter(16, CONFIG, rank=8), ValueError, "either config or keyword settings"),
    (lambda: MMAdapter(16, 8), TypeError, "config must be an AdapterConfig, got int"),
    (lambda: patch_llama(tiny_llama(), dropout=0.1), TypeError, "'dropout' is now 'dropout_p'"),
    (lambda: build_lavin(tiny_llama(), tiny_clip(), temprature=5.0), TypeError, "temprature"),
    (lambda: AdapterConfig(rank=6, groups=4), ValueError, "^groups 4 must divide rank 6$"),
    (lambda: AdapterConfig(dropout_p=1.0), ValueError, r"^dropout_p must be finite and in \[0, 1\)"),
    (lambda: AdapterConfig(rank=True), ValueError, "^rank must be a positive int"),
    (lambda: AdapterConfig(compat="LaVIN"), ValueError, "^compat must be one of"),
])
def test_bad_settings_raise_one_line_naming_the_setting(call, error, message):
    with pytest.raises(error, match=message) as raised:
        call()
    assert "\n" not in str(raised.value)


def test_build_lavin_clip_config_overrides_the_vision_side():
    clip_config = dataclasses.replace(CONFIG, temperature=2.0)
    model = build_lavin(tiny_llama(), tiny_clip(), CONFIG, clip_config=clip_config, neck_hidden=8)
    assert patch_state(model.llama, "llama")["config"] == CONFIG
    assert patch_state(model.clip, "clip")["config"] == clip_config
    with pytest.raises(ValueError, match="clip_config.compat must equal config.compat"):
        build_lavin(tiny_llama(), tiny_clip(), CONFIG, neck_hidden=8,
                    clip_config=dataclasses.replace(CONFIG, compat="lavin"))


def test_adapter_config_json_of_older_versions_still_loads(tmp_path):
    """Files written before the rename spell dropout_p "dropout" and have no "compat"."""
    model = randomize_adapters(patch_llama(tiny_llama(), CONFIG))
    save_adapters(model, tmp_path)
    path = tmp_path / CONFIG_NAME
    saved = json.loads(path.read_text())
    record = saved["components"]["llama"]
    assert record["dropout_p"] == 0.0 and record["compat"] is None
    record["dropout"] = record.pop("dropout_p")
    del record["compat"]
    path.write_text(json.dumps(saved))
    for fresh in (tiny_llama(), patch_llama(tiny_llama(), CONFIG)):
        load_adapters(fresh, tmp_path)
        assert patch_state(fresh, "llama")["config"] == CONFIG
        ids = token_ids()
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_compat_mode_round_trips_through_save_and_load(tmp_path):
    lavin = randomize_adapters(build_lavin(tiny_llama(), tiny_clip(), neck_hidden=16, dropout_p=0.0,
                                           compat="lavin", **PREFIXES)).eval()
    save_adapters(lavin, tmp_path)
    components = json.loads((tmp_path / CONFIG_NAME).read_text())["components"]
    assert components["llama"]["compat"] == components["clip"]["compat"] == "lavin"
    fresh = build_lavin(tiny_llama(), tiny_clip(), neck_hidden=16, dropout_p=0.0, compat="lavin",
                        **PREFIXES).eval()
    load_adapters(fresh, tmp_path)
    ids = token_ids(batch=3)
    assert torch.equal(fresh(ids, PIXELS, HAS_IMAGE).logits, lavin(ids, PIXELS, HAS_IMAGE).logits)
    ours = build_lavin(tiny_llama(), tiny_clip(), neck_hidden=16, dropout_p=0.0)
    with pytest.raises(ValueError, match="compat='lavin'"):
        load_adapters(ours, tmp_path)


def test_an_unpatched_model_is_patched_in_the_saved_compat_mode(tmp_path):
    config = AdapterConfig(dropout_p=0.0, compat="lavin")
    save_adapters(randomize_adapters(patch_llama(tiny_llama(), config)), tmp_path / "llama")
    save_adapters(randomize_adapters(patch_clip_vision(tiny_clip(), config)), tmp_path / "clip")
    llama = load_adapters(tiny_llama(), tmp_path / "llama")
    clip = load_adapters(tiny_clip(), tmp_path / "clip")
    assert patch_state(llama, "llama")["config"] == config
    llama_norm, clip_norm = adapted_norms(llama)[0], adapted_norms(clip)[0]
    assert llama_norm.adapter.routing_dtype == clip_norm.adapter.routing_dtype == torch.float16
    assert clip_norm.sequence_first and not llama_norm.sequence_first


def test_training_flags_map_onto_the_config_and_saved_names_stay():
    config = config_from_args(build_parser().parse_args(
        ["--rank", "4", "--experts", "3", "--adapter-scale", "0.5", "--temperature", "5",
         "--adapter-dropout", "0", "--placement", "block"]))
    assert config.adapter == CONFIG
    flat = options_dict(config)
    assert "adapter" not in flat
    assert {option: flat[option] for option in ADAPTER_FLAGS.values()} == {
        "rank": 4, "experts": 3, "groups": 2, "adapter_scale": 0.5, "temperature": 5.0,
        "adapter_dropout": 0.0, "placement": "block"}
    assert options_dict(TrainConfig())["adapter_dropout"] == AdapterConfig().dropout_p
    with pytest.raises(ValueError, match=r"^--adapter-dropout must be finite and in \[0, 1\)"):
        config_from_args(build_parser().parse_args(["--adapter-dropout", "1"]))
