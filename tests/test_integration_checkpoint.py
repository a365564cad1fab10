"""Adapter checkpoints: safetensors round trip (bit-exact), config JSON, mismatches, LaVIN-format
import (no pickle by default), and PEFT interop (skipped without peft)."""
import json
import os

import pytest
import torch

from mlan_kernels.integrations.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict,
                                     load_adapters, load_lavin_adapters, save_adapters)
from mlan_kernels.integrations import adapters, patch_llama
from mlan_kernels.integrations.lavin import build_lavin
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama

from test_integration_lavin import PIXELS, HAS_IMAGE, tiny_lavin
from test_integration_llama import loss_and_grads, randomize_adapters, token_ids


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = randomize_adapters(patch_llama(tiny_llama(), placement="block", temperature=5.0))
    save_adapters(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    llama = config["components"]["llama"]
    assert llama["rank"] == 8 and llama["placement"] == "block" and llama["temperature"] == 5.0
    assert llama["model_class"] == "LlamaForCausalLM" and llama["hidden_size"] == 32
    assert "mlan_kernels_version" in config
    for fresh in (patch_llama(tiny_llama(), placement="block", temperature=5.0), tiny_llama()):
        load_adapters(fresh, tmp_path)             # the unpatched one is patched from the config
        saved, loaded = adapter_state_dict(model), adapter_state_dict(fresh)
        assert saved.keys() == loaded.keys()
        assert all(torch.equal(saved[name], loaded[name]) for name in saved)
        ids = token_ids()
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_load_rejects_mismatched_models(tmp_path):
    save_adapters(patch_llama(tiny_llama()), tmp_path)
    with pytest.raises(ValueError, match="do not match"):
        load_adapters(patch_llama(tiny_llama(), rank=4), tmp_path)
    with pytest.raises(ValueError, match="hidden size"):
        load_adapters(tiny_llama(hidden_size=64), tmp_path)
    with pytest.raises(ValueError, match="no adapters"):
        save_adapters(tiny_llama(), tmp_path / "empty")


def test_lavin_assembly_round_trip_includes_neck_and_embedding(tmp_path):
    model = tiny_lavin()
    save_adapters(model, tmp_path)
    names = adapter_state_dict(model).keys()
    assert {"neck.down.weight", "modality_embedding.weight", "clip.layers.7.attn.up.weight"} <= set(names)
    fresh = tiny_lavin()
    with torch.no_grad():
        fresh.neck.up.weight.zero_()
    load_adapters(fresh, tmp_path)
    ids = token_ids(batch=3, length=5)
    assert torch.equal(fresh(ids, PIXELS, HAS_IMAGE).logits, model(ids, PIXELS, HAS_IMAGE).logits)


def lavin_format_state_dict(model):
    """Our LaVIN assembly's trainable weights under LaVIN's parameter names."""
    state = {}
    for key, adapter in adapters(model).items():
        component, _, index, site = key.split(".")
        prefix = (f"layers.{index}." if component == "llama"
                  else f"backbone.visual.transformer.resblocks.{index}.") + f"adapter_{site}."
        state.update(adapter.to_lavin_state_dict(prefix))
    for ours, theirs in (("down", "conv_A"), ("up", "conv_B")):
        state[f"adapter_proj.{theirs}.weight"] = getattr(model.neck, ours).weight.detach().clone()
        state[f"adapter_proj.{theirs}.bias"] = getattr(model.neck, ours).bias.detach().clone()
    state["adapter_modality_embedding.weight"] = model.modality_embedding.weight.detach().clone()
    return state


def test_import_lavin_checkpoint(tmp_path):
    source = tiny_lavin()
    path = tmp_path / "lavin.pth"
    torch.save({"model": lavin_format_state_dict(source)}, path)
    target = tiny_lavin()
    with torch.no_grad():
        for parameter in adapter_state_dict(target).values():
            parameter.zero_()
    assert load_lavin_adapters(target, path) == ([], [])       # torch.load(weights_only=True)
    expected, loaded = adapter_state_dict(source), adapter_state_dict(target)
    assert all(torch.equal(expected[name], loaded[name]) for name in expected)
    partial = {k: v for k, v in lavin_format_state_dict(source).items() if "adapter_proj" not in k}
    with pytest.raises(ValueError, match="missing"):
        load_lavin_adapters(target, partial)
    missing, _ = load_lavin_adapters(target, partial, strict=False)
    assert missing == ["neck.down.bias", "neck.down.weight", "neck.up.bias", "neck.up.weight"]


def test_peft_lora_and_mm_adapters_train_together_and_save_separately(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False))
    patch_llama(model)
    randomize_adapters(model)
    model.train()
    _, grads = loss_and_grads(model, token_ids())
    assert any("lora_" in name for name in grads) and any(".adapter." in name for name in grads)
    assert all("lora_" in name or ".adapter." in name for name in grads)
    save_adapters(model, tmp_path / "mlan")
    model.save_pretrained(tmp_path / "lora")
    ours = adapter_state_dict(model)
    assert ours and not any("lora" in name for name in ours)
    from safetensors.torch import load_file
    lora = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert lora and not any(".adapter." in name for name in lora)


def test_build_lavin_with_a_peft_wrapped_llama_freezes_the_clip_base():
    """PEFT's flags are kept inside the wrapped LLaMA (LoRA trains, its base stays frozen), and
    every part outside it is frozen as usual: the CLIP base, not only the LLaMA base."""
    peft = pytest.importorskip("peft")
    llama = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = build_lavin(llama, tiny_clip(), neck_hidden=16)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trainable)
    assert any(name.startswith("clip.") and ".adapter." in name for name in trainable)
    outside = {name for name in trainable if "lora_" not in name and ".adapter." not in name}
    assert outside == {name for name, _ in model.named_parameters()
                       if name.startswith(("neck.", "modality_embedding."))}


# ---------------------------------------------------------------- atomic load_adapters
def _snapshot(model):
    """Everything a failed load must leave as it was: module tree, tensors, flags, RNG."""
    return ([(name, type(module).__name__) for name, module in model.named_modules()],
            {name: tensor.clone() for name, tensor in model.state_dict().items()},
            {name: p.requires_grad for name, p in model.named_parameters()},
            torch.get_rng_state())


def _assert_unchanged(model, before):
    tree, state, flags, rng = _snapshot(model)
    assert tree == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[name], before[1][name]) for name in state)
    assert flags == before[2] and torch.equal(rng, before[3])


def _edit_config(directory, edit):
    config = json.loads((directory / CONFIG_NAME).read_text())
    edit(config)
    (directory / CONFIG_NAME).write_text(json.dumps(config))


def _edit_tensors(directory, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(directory / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS_NAME)


FIRST = "llama.layers.0.attn.down.weight"
BAD_ADAPTER_DIRECTORIES = {
    "truncated": (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-64]),
                  "adapter_model.safetensors: unreadable"),
    "missing_key": (lambda d: _edit_tensors(d, lambda t: t.pop("llama.layers.1.attn.up.bias")),
                    "missing \\['llama.layers.1.attn.up.bias'\\]"),
    "extra_key": (lambda d: _edit_tensors(d, lambda t: t.update(extra=torch.zeros(2))),
                  "unexpected \\['extra'\\]"),
    "wrong_rank_tensor": (lambda d: _edit_tensors(d, lambda t: t.update({FIRST: torch.zeros(4, 32)})),
                          f"tensor '{FIRST}' has shape \\[4, 32\\]"),
    "wrong_rank_config": (lambda d: _edit_config(d, lambda c: c["components"]["llama"].update(rank=4)),
                          "has shape|do not match"),
    "unknown_component": (lambda d: _edit_config(d, lambda c: c["components"].update(vit={})),
                          "components\\['vit'\\]: unknown component; expected one of"),
    "missing_field": (lambda d: _edit_config(d, lambda c: c["components"]["llama"].pop("temperature")),
                      "components\\['llama'\\]: missing field\\(s\\) \\['temperature'\\]"),
    "bad_placement": (lambda d: _edit_config(d, lambda c: c["components"]["llama"].update(placement="x")),
                      "placement must be one of|do not match"),
    "nan": (lambda d: _edit_tensors(d, lambda t: t[FIRST].view(-1).__setitem__(3, float("nan"))),
            f"tensor '{FIRST}' holds non-finite values"),
    "integer": (lambda d: _edit_tensors(d, lambda t: t.update({FIRST: t[FIRST].to(torch.int32)})),
                f"tensor '{FIRST}' has dtype torch.int32; adapter weights must be floating point"),
    "config_list": (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"),
                    "adapter_config.json: expected a JSON object, got list"),
    "config_not_json": (lambda d: (d / CONFIG_NAME).write_text("{"), "adapter_config.json: not a JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTER_DIRECTORIES))
@pytest.mark.parametrize("target", ["unpatched", "patched"])
def test_a_failing_load_leaves_the_model_exactly_as_it_was(tmp_path, case, target):
    damage, message = BAD_ADAPTER_DIRECTORIES[case]
    save_adapters(randomize_adapters(patch_llama(tiny_llama(layers=2))), tmp_path)
    damage(tmp_path)
    model = tiny_llama(layers=2, seed=1)
    if target == "patched":
        model = randomize_adapters(patch_llama(model))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_adapters(model, tmp_path)
    _assert_unchanged(model, before)


def test_a_load_that_fails_after_patching_unpatches_again(tmp_path, monkeypatch):
    """The shape check runs after patching an unpatched model: its failure removes the patch."""
    save_adapters(patch_llama(tiny_llama(layers=2)), tmp_path)
    _edit_tensors(tmp_path, lambda t: t.update({FIRST: torch.zeros(8, 32, dtype=torch.float64)[:4]}))
    model = tiny_llama(layers=2, seed=1)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="shape"):
        load_adapters(model, tmp_path)
    _assert_unchanged(model, before)
    assert adapters(model) == {}
