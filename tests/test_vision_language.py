"""One contract, every whole vision-language model type (families.VISION_LANGUAGE_TYPES), built
from HF's own classes with tiny configs (integrations/tiny.py): patch -> a mixed batch (one image
sample, one text-only) trains only what should train -> routing differs by modality -> a
left- or right-padded batch equals each sample alone -> greedy, beam and sampled generate with
and without the cache and with and without an image -> save/load -> merge/unmerge -> unpatch
restores the base bit-exactly. Types the installed transformers lacks are skipped."""
import json

import pytest
import torch

import mlan_kernels as mk
from mlan_kernels.integrations import (AdaptedNorm, adapters, merge_adapters, record_routing_weights,
                                      unmerge_adapters)
from mlan_kernels.integrations.families import VISION_LANGUAGE_TYPES
from mlan_kernels.integrations.tiny import (TINY_VISION_LANGUAGE, tiny_image, tiny_llama,
                                            tiny_vision_language_inputs, tiny_vision_language_model)
from mlan_kernels.integrations.vlm import modality_embedding, vision_language_parts

from helpers import randomize_adapters

TYPES = sorted(VISION_LANGUAGE_TYPES)
# Padding and batching change nothing but float summation order: the bound asked of a user's
# left-padded batch against each sample alone (fp32 logits).
PADDING_ATOL = 1e-5
IMAGE_TEXT, PLAIN_TEXT = [5, 6, 7], [9, 10]


def build(model_type, seed=0):
    try:
        return tiny_vision_language_model(model_type, seed=seed)
    except (ValueError, KeyError, ImportError) as error:
        import transformers
        pytest.skip(f"transformers {transformers.__version__} lacks {model_type!r}: {str(error)[:80]}")


def samples(model_type):
    image = tiny_image(model_type, torch.Generator().manual_seed(0))
    return (IMAGE_TEXT, image), (PLAIN_TEXT, None)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def patched(model_type):
    model = build(model_type)
    mk.patch(model)
    return randomize_adapters(model)


@pytest.mark.parametrize("model_type", TYPES)
def test_whole_model_patch_adapts_both_sides_and_a_mixed_batch_trains_only_adapters(model_type):
    model = build(model_type)
    image_sample, text_sample = samples(model_type)
    batch = tiny_vision_language_inputs(model_type, [image_sample, text_sample])
    base = logits(model, batch)
    mk.patch(model)
    keys = sorted(adapters(model))
    assert keys == ["clip.layers.0.attn", "clip.layers.1.attn", "llama.layers.0.attn", "llama.layers.1.attn"]
    assert torch.equal(logits(model, batch), base)          # zero up-projections: identity at init
    randomize_adapters(model)
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable == {name for name in trainable if ".adapter." in name or "mlan_modality_embedding" in name}
    assert with_grad <= trainable
    assert any("mlan_modality_embedding" in name for name in with_grad)   # the signal trains
    assert {key.split(".")[0] for key in keys} == {"llama", "clip"}
    assert any(name.startswith("model.") or "language_model" in name for name in with_grad)


@pytest.mark.parametrize("model_type", TYPES)
def test_routing_differs_by_modality_from_the_first_layer_and_is_the_modality_embeddings(model_type):
    model = patched(model_type)
    batch = tiny_vision_language_inputs(model_type, list(samples(model_type)))
    with record_routing_weights(model) as recorder, torch.no_grad():
        model(**batch)
    parts = vision_language_parts(model)
    embedding = modality_embedding(model).weight.detach()
    for index, layer in enumerate(l for l in parts["llama"].modules() if hasattr(l, "input_layernorm")):
        adapted = layer.input_layernorm
        weights = recorder.weights[f"llama.layers.{index}.attn"]
        # by hand: softmax((W_R · norm_l(e_modality) + b_R) / t), image row 0, text row 1
        normed = adapted.norm(embedding[[1, 0]][:, None])[:, 0].double()
        router = adapted.adapter.router
        expected = torch.softmax((normed @ router.weight.double().t() + router.bias.double())
                                 / adapted.adapter.temperature, dim=1)
        torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-6)
        assert (weights[0] - weights[1]).abs().max() > 1e-5      # image and text rows differ


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("model_type", TYPES)
def test_a_padded_mixed_batch_equals_each_sample_alone(model_type, padding_side):
    model = patched(model_type)
    image_sample, text_sample = samples(model_type)
    batch = tiny_vision_language_inputs(model_type, [image_sample, text_sample], padding_side)
    with record_routing_weights(model) as routed_together:
        together = logits(model, batch)
    for row, sample in enumerate((image_sample, text_sample)):
        with record_routing_weights(model) as routed_alone:
            alone = logits(model, tiny_vision_language_inputs(model_type, [sample]))[0]
        real = batch["attention_mask"][row].bool()
        torch.testing.assert_close(together[row][real], alone, rtol=0, atol=PADDING_ATOL)
        for key, weights in routed_alone.weights.items():
            if key.startswith("llama."):                 # the vision tower sees only the image rows
                torch.testing.assert_close(routed_together.weights[key][row], weights[0], rtol=0, atol=1e-6)


GENERATE_SETTINGS = {"greedy": dict(do_sample=False), "beam": dict(do_sample=False, num_beams=2),
                     "greedy-no-cache": dict(do_sample=False, use_cache=False)}


@pytest.mark.parametrize("setting", sorted(GENERATE_SETTINGS))
@pytest.mark.parametrize("model_type", TYPES)
def test_generate_on_a_left_padded_mixed_batch_equals_each_sample_alone(model_type, setting):
    model = patched(model_type)
    model.generation_config.pad_token_id = 0
    image_sample, text_sample = samples(model_type)
    kwargs = dict(max_new_tokens=3, **GENERATE_SETTINGS[setting])
    batch = tiny_vision_language_inputs(model_type, [image_sample, text_sample])
    together = model.generate(**batch, **kwargs)
    for row, sample in enumerate((image_sample, text_sample)):
        inputs = tiny_vision_language_inputs(model_type, [sample])
        alone = model.generate(**inputs, **kwargs)
        assert (until_eos(together[row, batch["input_ids"].shape[1]:])
                == until_eos(alone[0, inputs["input_ids"].shape[1]:])), (setting, row)


def until_eos(tokens, eos=2):
    """The new tokens up to and including the first EOS (what follows it is padding)."""
    tokens = tokens.tolist()
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl"])
def test_sampled_generate_with_the_cache_equals_without(model_type):
    model = patched(model_type)
    model.generation_config.pad_token_id = 0
    batch = tiny_vision_language_inputs(model_type, list(samples(model_type)))
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        runs.append(model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=0, use_cache=use_cache))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("model_type", TYPES)
def test_save_load_round_trip_into_an_unpatched_model(model_type, tmp_path):
    model = patched(model_type)
    batch = tiny_vision_language_inputs(model_type, list(samples(model_type)))
    mk.save_adapters(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["components"]["llama"]["modality_routing"] is True
    fresh = mk.load_adapters(build(model_type), tmp_path)
    assert torch.equal(logits(fresh, batch), logits(model, batch))


@pytest.mark.parametrize("model_type", TYPES)
def test_merge_folds_the_language_side_for_one_modality_and_unmerge_restores(model_type):
    model = patched(model_type)
    image_sample, text_sample = samples(model_type)
    for modality, sample in (("text", text_sample), ("image", image_sample)):
        inputs = tiny_vision_language_inputs(model_type, [sample])
        adapted = logits(model, inputs)
        state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        merge_adapters(model, mk.modality_routing_weights(model, modality), component="llama")
        assert not any(isinstance(module, AdaptedNorm) and module.key.startswith("llama")
                       for module in model.modules())       # no language adapter in the forward path
        torch.testing.assert_close(logits(model, inputs), adapted, rtol=0, atol=PADDING_ATOL)
        unmerge_adapters(model)
        assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())


@pytest.mark.parametrize("model_type", TYPES)
def test_unpatch_restores_the_base_bit_exactly_with_its_own_trainable_flags(model_type):
    model = build(model_type)
    batch = tiny_vision_language_inputs(model_type, list(samples(model_type)))
    base = logits(model, batch)
    names = [name for name, _ in model.named_parameters()]
    for index, (name, parameter) in enumerate(model.named_parameters()):
        parameter.requires_grad_(index % 3 == 0)                # a user's own freezing pattern
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    mk.patch(model, component="clip")
    mk.patch(model, component="llama")
    randomize_adapters(model)
    mk.unpatch(model)
    assert [name for name, _ in model.named_parameters()] == names
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())
    assert torch.equal(logits(model, batch), base)


def test_one_side_only_and_the_language_side_through_patch_llama():
    model = build("llava")
    mk.patch(model, component="clip")
    assert sorted(adapters(model)) == ["clip.layers.0.attn", "clip.layers.1.attn"]
    assert modality_embedding(model) is None
    other = build("llava")
    mk.patch_llama(other)
    assert sorted(adapters(other)) == ["llama.layers.0.attn", "llama.layers.1.attn"]
    assert modality_embedding(other) is not None
    with pytest.raises(ValueError, match="component must be 'llama' or 'clip', got 'vision'"):
        mk.patch(build("llava"), component="vision")


def test_an_unsupported_side_is_an_error_naming_it_and_nothing_is_patched():
    model = build("qwen2_vl")                    # a vision tower without CLIP's block layout
    model.model.visual.config.model_type = "my_vision"      # the same object as vision_config
    with pytest.raises(ValueError, match=r"Qwen2VLForConditionalGeneration: cannot adapt its vision tower "
                                         r"Qwen2VisionTransformerPretrainedModel: model_type 'my_vision' is "
                                         r"not supported; supported: .*qwen2_vl_vision"):
        mk.patch(model)
    assert adapters(model) == {} and modality_embedding(model) is None


def projector(model):
    """(qualified name, module) of LLaVA's projector (model.multi_modal_projector on transformers
    5, multi_modal_projector on 4.x)."""
    return next((name, module) for name, module in model.named_modules() if name.endswith("multi_modal_projector"))


def test_modules_to_save_train_beside_the_adapters_and_travel_in_checkpoints(tmp_path):
    model = build("llava")
    mk.patch(model, modules_to_save=["multi_modal_projector"])
    name, module = projector(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"{name}.linear_1.weight", f"{name}.linear_2.bias"} <= trainable
    assert not any(n.endswith("lm_head.weight") for n in trainable)
    with torch.no_grad():
        module.linear_1.weight.add_(1.0)
    mk.save_adapters(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == [name]
    fresh = mk.load_adapters(build("llava"), tmp_path)
    assert torch.equal(projector(fresh)[1].linear_1.weight, module.linear_1.weight)
    with pytest.raises(ValueError, match="modules_to_save: no module named 'projector_typo'"):
        mk.patch(build("llava"), modules_to_save=["projector_typo"])


def test_routing_modality_overrides_what_the_inputs_say():
    model = patched("llava")
    batch = tiny_vision_language_inputs("llava", list(samples("llava")))
    with torch.no_grad(), record_routing_weights(model) as detected:
        model(**batch)
    with torch.no_grad(), mk.routing_modality(model, has_image=[False, False]), record_routing_weights(model) as forced:
        model(**batch)
    key = "llama.layers.0.attn"
    torch.testing.assert_close(forced.weights[key][0], detected.weights[key][1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="routing_modality: the model has no modality routing"):
        with mk.routing_modality(tiny_llama(), has_image=[True]):
            pass


def test_every_tiny_builder_has_a_vision_language_type_row():
    assert set(TINY_VISION_LANGUAGE) == set(VISION_LANGUAGE_TYPES)


def test_first_real_positions_on_hand_built_masks():
    from mlan_kernels.integrations.lavin import lavin_attention_mask
    from mlan_kernels.integrations.routing import first_real_positions
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    assert first_real_positions(left, 4).tolist() == [0, 2, 1]
    assert first_real_positions(left[:, 1:], 3).tolist() == [0, 1, 0]        # the last 3 columns
    assert first_real_positions(torch.ones(2, 5, dtype=torch.long), 5) is None  # all start at 0
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    static = causal[None, None] & left.bool()[:, None, None, :]              # a static cache's 4-D mask
    padded = torch.cat([static, torch.zeros(3, 1, 4, 2, dtype=torch.bool)], -1)  # unused cache slots
    assert first_real_positions(padded, 4).tolist() == [0, 2, 1]
    additive = torch.zeros(padded.shape).masked_fill(~padded, torch.finfo(torch.float32).min)
    assert first_real_positions(additive, 4).tolist() == [0, 2, 1]
    lavin = lavin_attention_mask(torch.tensor([5, 3]), 5, torch.float32)   # modality token seen by itself alone
    assert first_real_positions(lavin, 5) is None
