"""Which parameters each CoMMIT param group holds (not only its learning rate).

The feature side is the CLIP tower's trainable parameters, the visual neck and the modality
token; the language side is the LLaMA's. The expected sets come from the LavinModel's parts
(`model.clip.parameters()`, ...), not from parameter names, and the model is seen bare, inside a
DDP-like `module.` wrapper, inside torch.compile's `_orig_mod.` and both.
"""
import pytest
from torch import nn

from mlan_kernels.integrations.lavin import build_lavin
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama
from mlan_kernels.training.balance import FEATURE, LANGUAGE, balance_groups
from mlan_kernels.training.scheduler import GROUP_KEY
from mlan_train.model import param_groups

pytest.importorskip("accelerate")
from mlan_kernels.training.hf_trainer import side_of_name, side_param_groups  # noqa: E402


class Wrapper(nn.Module):
    """A module holding `inner` under `attribute` ("module" as DDP does, "_orig_mod" as
    torch.compile's OptimizedModule does)."""

    def __init__(self, inner, attribute):
        super().__init__()
        self.add_module(attribute, inner)


@pytest.fixture(scope="module")
def lavin():
    return build_lavin(tiny_llama(), tiny_clip(), neck_hidden=16)


def trainable_ids(*modules) -> set:
    return {id(p) for module in modules for p in module.parameters() if p.requires_grad}


def held(groups, side) -> set:
    return {id(p) for group in groups if group[GROUP_KEY] == side for p in group["params"]}


WRAPPINGS = {"bare": (), "ddp": ("module",), "compiled": ("_orig_mod",),
             "compiled_ddp": ("_orig_mod", "module")}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
def test_each_side_group_holds_its_parts_parameters_whatever_the_wrapper(lavin, wrapping, weight_decay):
    model = lavin
    for attribute in WRAPPINGS[wrapping]:
        model = Wrapper(model, attribute)
    groups = side_param_groups(model, weight_decay=weight_decay)
    feature = trainable_ids(lavin.clip, lavin.neck, lavin.modality_embedding)
    language = trainable_ids(lavin.llama)
    assert feature and language and len(feature) == 48 + 4 + 1 and len(language) == 12
    assert held(groups, FEATURE) == feature
    assert held(groups, LANGUAGE) == language
    assert len(groups) == (4 if weight_decay else 2)


NAMES = [
    ("module.clip.encoder.layers.0.layer_norm1.adapter.down.weight", FEATURE),
    ("_orig_mod.module.clip.encoder.layers.7.layer_norm1.adapter.router.bias", FEATURE),
    ("_orig_mod.neck.down.weight", FEATURE),
    ("module.modality_embedding.weight", FEATURE),
    ("base_model.model.vision_tower.clip.layers.0.weight", FEATURE),   # "clip" as a middle part
    ("neck.up.bias", FEATURE),
    ("module.llama.model.layers.0.input_layernorm.adapter.down.weight", LANGUAGE),
    ("base_model.model.llama.model.layers.0.self_attn.q_proj.lora_A.default.weight", LANGUAGE),
    ("llama.model.layers.0.clipper.weight", LANGUAGE),                  # "clip" inside a part
    ("llama.model.necklace.weight", LANGUAGE),
]


@pytest.mark.parametrize("name, side", NAMES, ids=[name for name, _ in NAMES])
def test_side_of_name_reads_whole_name_parts(name, side):
    assert side_of_name(name) == side


def test_the_training_program_groups_hold_the_same_sides(lavin):
    """mlan_train's param_groups, with a frozen base (by adapters) and with the base trained
    (by name): the same split of the parts."""
    model = build_lavin(tiny_llama(), tiny_clip(), neck_hidden=16, freeze_base=False)
    for train_base, source in ((False, lavin), (True, model)):
        groups = param_groups(source, weight_decay=0.1, train_base=train_base)
        assert held(groups, FEATURE) == trainable_ids(source.clip, source.neck, source.modality_embedding)
        assert held(groups, LANGUAGE) == trainable_ids(source.llama)
        assert all(group["weight_decay"] == (0.1 if group["params"][0].dim() >= 2 else 0.0)
                   for group in groups)


def test_balance_groups_split_a_frozen_lavin_by_its_parts(lavin):
    feature, language = balance_groups(lavin)
    assert {id(p) for p in feature} == trainable_ids(lavin.clip, lavin.neck, lavin.modality_embedding)
    assert {id(p) for p in language} == trainable_ids(lavin.llama)
