"""load_lavin_adapters on checkpoints written the way LaVIN's training writes them
(tests/lavin_reference.py: util/misc.py save_model under torchrun / in one process): default
weights_only=True load, DDP prefix, strictness, atomic failure, and the backbone.transformer form.
"""
import pickle
from dataclasses import dataclass

import pytest
import torch

from mlan_kernels.integrations.checkpoint import load_lavin_adapters
from mlan_kernels.integrations import adapters

from lavin_reference import LavinTrainables, save_lavin_checkpoint
from test_integration_lavin import tiny_lavin


@dataclass
class Marker:
    """A global that LaVIN's files never hold: weights_only=True must refuse it."""
    value: int = 1


def trainables(**kwargs):
    """LaVIN's trainable modules at tiny_lavin's sizes (LLaMA 32 x 2 layers, CLIP 32 x 8)."""
    return LavinTrainables(32, 2, 32, 8, neck_hidden=16, **kwargs)


def expect_loaded(model, lavin):
    """Every adapter of `model` computes what LaVIN's module computes from the file's tensors
    (same routing weights given to both), and the neck / modality embedding are LaVIN's."""
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    weights = torch.softmax(torch.randn(3, 2, generator=torch.Generator().manual_seed(3)), -1)
    ours = adapters(model)
    blocks = (lavin.backbone.visual.transformer if hasattr(lavin.backbone, "visual")
              else lavin.backbone.transformer).resblocks
    for component, holders in (("llama", lavin.layers), ("clip", blocks)):
        for index, holder in enumerate(holders):
            for site, module in holder.named_children():
                adapter = ours[f"{component}.layers.{index}.{site.removeprefix('adapter_')}"]
                with torch.no_grad():
                    torch.testing.assert_close(adapter(x, weights=weights), module(x, weights),
                                               rtol=1e-6, atol=1e-6)
                    routed = adapter.routing_weights(x)
                    torch.testing.assert_close(routed, module.routing_weights(x).float(),
                                               rtol=0, atol=1e-3)      # LaVIN rounds to fp16
    assert torch.equal(model.neck.down.weight, lavin.adapter_proj.conv_A.weight)
    assert torch.equal(model.neck.up.bias, lavin.adapter_proj.conv_B.bias)
    assert torch.equal(model.modality_embedding.weight, lavin.adapter_modality_embedding.weight)


def snapshot(model):
    """Everything a failed load must not change: tensors, module tree, requires_grad flags."""
    return ({name: tensor.clone() for name, tensor in model.state_dict().items()},
            [(name, type(module).__name__) for name, module in model.named_modules()],
            {name: p.requires_grad for name, p in model.named_parameters()})


def assert_unchanged(model, before):
    tensors, tree, flags = snapshot(model)
    assert tree == before[1] and flags == before[2]
    assert tensors.keys() == before[0].keys()
    assert all(torch.equal(tensors[name], before[0][name]) for name in tensors)


@pytest.mark.parametrize("ddp", [True, False], ids=["torchrun", "single-process"])
@pytest.mark.parametrize("placement", ["attn", "block"])
def test_loads_lavin_training_checkpoint_with_default_call(tmp_path, ddp, placement):
    lavin = trainables(placement=placement, clip_placement=placement)
    path = tmp_path / "checkpoint-19.pth"
    saved = save_lavin_checkpoint(path, lavin, ddp=ddp)
    assert all(name.startswith("module.") == ddp for name in saved)
    with pytest.raises(pickle.UnpicklingError):           # what torch alone does with the file
        torch.load(path, weights_only=True)
    model = tiny_lavin(placement=placement)
    assert load_lavin_adapters(model, path) == ([], [])
    expect_loaded(model, lavin)


def test_other_globals_stay_refused(tmp_path):
    path = tmp_path / "marked.pth"
    state = {f"module.{n}": p.data for n, p in trainables().named_parameters()}
    torch.save({"model": state, "args": Marker()}, path)
    model = tiny_lavin()
    before = snapshot(model)
    with pytest.raises(pickle.UnpicklingError, match="marked.pth: refused by torch.load") as error:
        load_lavin_adapters(model, path)
    assert "\n" not in str(error.value)
    assert_unchanged(model, before)
    assert load_lavin_adapters(model, path, weights_only=False) == ([], [])   # a trusted file


def test_backbone_transformer_form_loads_and_is_not_random(tmp_path):
    lavin = trainables(clip_path="")
    path = tmp_path / "short.pth"
    saved = save_lavin_checkpoint(path, lavin, ddp=True)
    assert any(name.startswith("module.backbone.transformer.resblocks.7.") for name in saved)
    model = tiny_lavin()
    assert load_lavin_adapters(model, path, strict=False) == ([], [])
    expect_loaded(model, lavin)
    assert load_lavin_adapters(tiny_lavin(), path) == ([], [])


def test_strict_lists_missing_and_unexpected_and_strict_false_loads_the_rest(tmp_path):
    lavin = trainables()
    state = {f"module.{n}": p.data for n, p in lavin.named_parameters() if "adapter_proj" not in n}
    state["module.adapter_extra.weight"] = torch.ones(3)
    model = tiny_lavin()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"missing \[neck.down.bias, neck.down.weight, neck.up.bias, "
                                         r"neck.up.weight\], unexpected \[adapter_extra.weight\]"):
        load_lavin_adapters(model, {"model": state})
    assert_unchanged(model, before)
    missing, unexpected = load_lavin_adapters(model, {"model": state}, strict=False)
    assert missing == ["neck.down.bias", "neck.down.weight", "neck.up.bias", "neck.up.weight"]
    assert unexpected == ["adapter_extra.weight"]
    assert torch.equal(model.neck.up.weight, before[0]["neck.up.weight"])      # kept
    assert torch.equal(model.modality_embedding.weight, lavin.adapter_modality_embedding.weight)


def _state(**edits):
    state = {f"module.{n}": p.data.clone() for n, p in trainables().named_parameters()}
    state.update(edits)
    return state


BAD_PAYLOADS = {
    "list payload": ([1, 2], "expected a dict"),
    "model is a list": ({"model": [1]}, "key 'model' must hold a state dict"),
    "nan value": ({"model": _state(**{"module.adapter_proj.conv_B.bias": torch.full((32,), float("nan"))})},
                  r"'module.adapter_proj.conv_B.bias' has non-finite"),
    "integer tensor": ({"model": _state(**{"module.layers.1.adapter_attn.conv_A.bias": torch.ones(8, dtype=torch.long)})},
                      r"'module.layers.1.adapter_attn.conv_A.bias' must be a floating-point tensor"),
    "not a tensor": ({"model": _state(**{"module.adapter_modality_embedding.weight": [0.0]})},
                     "must be a floating-point tensor, got list"),
    "last shape wrong": ({"model": _state(**{"module.adapter_proj.conv_B.bias": torch.ones(31)})},
                         r"neck.up.bias: checkpoint shape \[31\] != model shape \[32\]"),
    "adapter incomplete": ({"model": {k: v for k, v in _state().items() if "resblocks.7.adapter_attn.conv_D" not in k}},
                           "missing LaVIN RepAdapter_Router keys"),
    "missing strict": ({"model": {k: v for k, v in _state().items() if "layers.1." not in k}},
                       r"missing \[llama.layers.1.attn.down.bias"),
}


@pytest.mark.parametrize("case", BAD_PAYLOADS)
def test_failed_load_leaves_the_model_exactly_as_it_was(tmp_path, case):
    payload, message = BAD_PAYLOADS[case]
    path = tmp_path / "bad.pth"
    torch.save(payload, path)
    model = tiny_lavin()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as error:
        load_lavin_adapters(model, path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    assert_unchanged(model, before)
