"""unpatch gives back each base parameter's own requires_grad flag, whatever it was before
patching: a base frozen in a pattern by the user, and a PEFT-wrapped base (LoRA trainable, the
rest frozen) — not "everything trainable", which is what a fresh model happens to have."""
import pytest

from mlan_kernels.integrations import patch_llama, unpatch
from mlan_kernels.integrations.tiny import tiny_llama


def flags(model) -> dict:
    return {name: parameter.requires_grad for name, parameter in model.named_parameters()}


def frozen_in_a_pattern():
    """A tiny LLaMA whose embeddings and first block are frozen; block 1's attention, the
    final norm and lm_head stay trainable; block 1's MLP is frozen."""
    model = tiny_llama()
    model.model.embed_tokens.requires_grad_(False)
    model.model.layers[0].requires_grad_(False)
    model.model.layers[1].mlp.requires_grad_(False)
    return model


def expected_pattern(name: str) -> bool:
    """The flag frozen_in_a_pattern gives `name`, written out from its rule."""
    return not (name.startswith(("model.embed_tokens.", "model.layers.0.")) or
                name.startswith("model.layers.1.mlp."))


@pytest.mark.parametrize("freeze_base", [True, False])
def test_unpatch_restores_a_base_frozen_in_a_pattern(freeze_base):
    model = frozen_in_a_pattern()
    before = flags(model)
    assert before == {name: expected_pattern(name) for name in before}
    assert any(before.values()) and not all(before.values())
    patch_llama(model, freeze_base=freeze_base)
    if freeze_base:
        assert not any(flag for name, flag in flags(model).items() if ".adapter." not in name)
    unpatch(model)
    assert flags(model) == before


def test_unpatch_restores_the_flags_of_a_peft_wrapped_base():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = flags(model)
    assert before == {name: "lora_" in name for name in before}     # PEFT: LoRA alone trains
    patch_llama(model)
    assert any(".adapter." in name for name, flag in flags(model).items() if flag)
    unpatch(model)
    assert flags(model) == before


def test_unpatching_one_of_two_patches_keeps_the_flags_the_other_set():
    """Patched, unpatched and patched again on a frozen base: each unpatch goes back to the
    flags the model had just before its own patch."""
    model = frozen_in_a_pattern()
    before = flags(model)
    patch_llama(model, freeze_base=False)
    unpatch(model)
    model.lm_head.requires_grad_(False)
    now = flags(model)
    patch_llama(model)
    unpatch(model)
    assert flags(model) == now and now == {**before, "lm_head.weight": False}
