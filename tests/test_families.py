"""One contract, every family in the model-type table (integrations/families.py), PEFT's
`testing_common` style: adding a family adds a row to FAMILIES, not a test file.

Per family, on a tiny random model built in code (integrations/tiny.py: grouped-query attention,
sliding windows where the family has them): identity at init, frozen base with only adapters
training, per-sample routing, KV-cached greedy generation == recomputation, merge -> same outputs
-> unmerge bit-exact, save/load round trip, torch.compile of one patched block."""
import pytest
import torch

import mlan_kernels as mk
from mlan_kernels.integrations import AdaptedNorm, adapters, merge_adapters, unmerge_adapters
from mlan_kernels.integrations.families import MODEL_TYPES, blocks, family_of, patch
from mlan_kernels.integrations.tiny import TINY_VISION_TYPES, tiny_model

from test_integration_llama import randomize_adapters

FAMILIES = sorted(MODEL_TYPES)


def build(model_type, seed=0):
    """tiny_model(model_type); skipped when the installed transformers predates the family."""
    try:
        return tiny_model(model_type, seed=seed)
    except (ValueError, KeyError) as error:
        import transformers
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r}: "
                    f"{str(error).splitlines()[0][:80]}")


def is_vision(model_type):
    return model_type in TINY_VISION_TYPES


def inputs(model_type, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if is_vision(model_type):
        return {"pixel_values": torch.randn(batch, 3, 28, 28, generator=generator)}
    return {"input_ids": torch.randint(3, 97, (batch, 6), generator=generator)}


def output(model, batch):
    """The tensor a user reads: logits (decoders) or last hidden state (vision towers)."""
    with torch.no_grad():
        out = model(**batch) if "pixel_values" in batch else model(**batch, use_cache=False)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_every_family_has_a_row_and_an_unknown_type_is_a_clear_error():
    assert set(FAMILIES) >= {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                             "gemma3_text", "phi3", "clip_vision_model", "siglip_vision_model"}
    model = build("llama")
    model.config.model_type = "my_new_model"
    with pytest.raises(ValueError, match="'my_new_model' is not supported; supported: .*llama.*"
                                         "To add one, add a Family row"):
        patch(model)
    # patch_llama keeps working on a LLaMA-shaped model of an unknown type (e.g. llava_llama)
    mk.patch_llama(model)
    assert len(adapters(model)) == 2
    with pytest.raises(ValueError, match="'clip_vision_model' is not a language model"):
        mk.patch_llama(build("clip_vision_model"))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_identity_at_init_frozen_base_and_adapter_only_gradients(model_type):
    model, batch = build(model_type), inputs(model_type)
    base = output(model, batch)
    patch(model, placement="block")
    family = family_of(model)
    layers = blocks(model, family)
    assert len(layers) == 2 and len(adapters(model)) == 4
    for layer in layers:
        for site in family.sites.values():
            assert isinstance(getattr(layer, site.norm_attribute), AdaptedNorm)
    assert torch.equal(output(model, batch), base)
    randomize_adapters(model)
    model.train()
    out = model(**batch) if is_vision(model_type) else model(**batch, labels=batch["input_ids"])
    loss = out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.square().mean()
    loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in name for name in trainable)
    assert {name for name, p in model.named_parameters() if p.grad is not None} == trainable


@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_sample_is_routed_by_itself(model_type):
    model = randomize_adapters(patch(build(model_type)))
    batch = inputs(model_type, batch=3)
    together = output(model, batch)
    for b in range(3):
        alone = output(model, {key: value[b:b + 1] for key, value in batch.items()})
        torch.testing.assert_close(alone[0], together[b], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", [t for t in FAMILIES if not is_vision(t)])
def test_cached_generation_equals_recomputation(model_type):
    model = randomize_adapters(patch(build(model_type), placement="block"))
    ids = inputs(model_type)["input_ids"]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_logits=True)
    cached = model.generate(ids, use_cache=True, **kwargs)
    assert blocks(model, family_of(model))[1].input_layernorm.phase == "decode"
    # cache_implementation=None: transformers 4.45 crashes formatting its Gemma-2 warning that a
    # hybrid cache_implementation has no effect without a cache
    recomputed = model.generate(ids, use_cache=False, cache_implementation=None, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step_cached, step_full in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(step_cached, step_full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("model_type", [t for t in FAMILIES if not is_vision(t)])
def test_a_padded_sample_is_routed_and_answered_as_alone(model_type, padding_side):
    """The router reads each sample's first real token (from attention_mask), not a pad token."""
    model = randomize_adapters(patch(build(model_type), placement="block"))
    short, long = [1, 10, 11, 12], [1, 5, 6, 7, 8, 9]
    pad = [0] * (len(long) - len(short))
    ids = torch.tensor([long, pad + short if padding_side == "left" else short + pad])
    mask = (torch.arange(len(long)) >= len(pad)).long() if padding_side == "left" else \
        (torch.arange(len(long)) < len(short)).long()
    mask = torch.stack([torch.ones(len(long), dtype=torch.long), mask])
    with torch.no_grad():
        together = model(ids, attention_mask=mask, use_cache=False).logits[1][mask[1].bool()]
        alone = model(torch.tensor([short]), use_cache=False).logits[0]
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    if padding_side == "left":                 # how HF batches generation
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        for beams in (1, 2):
            batch = model.generate(ids, attention_mask=mask, num_beams=beams, **kwargs)[1, len(long):]
            single = model.generate(torch.tensor([short]), num_beams=beams, **kwargs)[0, len(short):]
            assert torch.equal(batch[:len(single)], single), beams


@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_merge_keeps_outputs_and_unmerge_is_bit_exact(model_type, placement):
    model = randomize_adapters(patch(build(model_type), placement=placement, scale=0.5))
    batch = inputs(model_type, batch=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with mk.record_routing_weights(model) as recorder:
        reference = output(model, batch)
    merge_adapters(model, recorder.weights)
    assert not any(isinstance(m, AdaptedNorm) for m in model.modules())
    torch.testing.assert_close(output(model, batch), reference, rtol=1e-4, atol=1e-5)
    unmerge_adapters(model)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert torch.equal(output(model, batch), reference)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_adapters_save_and_load_into_a_fresh_model(model_type, tmp_path):
    model = randomize_adapters(patch(build(model_type), placement="block"))
    batch = inputs(model_type)
    mk.save_adapters(model, tmp_path)
    fresh = mk.load_adapters(build(model_type), tmp_path)
    assert torch.equal(output(fresh, batch), output(model, batch))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_one_patched_block_compiles(model_type):
    """The block is called with the arguments the model itself passes (captured by a hook),
    so the test does not depend on each family's block signature."""
    model = randomize_adapters(patch(build(model_type)))
    layer = blocks(model, family_of(model))[0]
    captured = {}
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(args=args, kwargs=kwargs), with_kwargs=True)
    output(model, inputs(model_type))
    handle.remove()
    eager = layer(*captured["args"], **captured["kwargs"])
    compiled = torch.compile(layer, backend="aot_eager")(*captured["args"], **captured["kwargs"])
    first = lambda out: out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(first(compiled), first(eager), rtol=1e-5, atol=1e-5)


def test_readme_support_table_is_the_model_type_table():
    import os
    from mlan_kernels.integrations.families import support_table
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    start = readme.index("<!-- families:start -->\n") + len("<!-- families:start -->\n")
    assert readme[start:readme.index("\n<!-- families:end -->")] == support_table()


LAVIN_PAIRS = [(decoder, vision) for index, decoder in enumerate(
    t for t in FAMILIES if not is_vision(t)) for vision in [TINY_VISION_TYPES[index % 2]]]


@pytest.mark.parametrize("decoder, vision", LAVIN_PAIRS)
def test_lavin_assembly_on_any_pair(decoder, vision):
    """build_lavin on every decoder, each paired with CLIP or SigLIP: the neck reads the tower's
    summary token (CLS, or the mean patch for SigLIP) after every k-th block; a training step
    reaches only adapters, neck and modality token; cached generation == recomputation."""
    llama, tower = build(decoder), build(vision, seed=1)
    model = mk.build_lavin(llama, tower, neck_hidden=8, clip_every=1, dropout_p=0.0)
    randomize_adapters(model)
    pixels = inputs(vision, batch=2)["pixel_values"]
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        summary = [h[:, 0] if vision == "clip_vision_model" else h.mean(1) for h in hidden[1:]]
        torch.testing.assert_close(model.image_tokens(pixels), model.neck(torch.stack(summary, 1)))
    ids = inputs(decoder)["input_ids"]
    has_image = torch.tensor([True, False])
    model.train()
    loss = model(ids, pixels, has_image, labels=ids).loss
    loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".adapter." in n or n.startswith(("neck.", "modality_embedding."))
                           for n in trained)
    assert any(n.startswith("clip.") for n in trained) and any(n.startswith("neck.") for n in trained)
    model.eval()
    for rows in ([0], [1]):                               # one modality per generate call
        args = (ids[rows], pixels[rows], has_image[rows])
        cached = model.generate(*args, max_new_tokens=4, use_cache=True)
        assert torch.equal(cached, model.generate(*args, max_new_tokens=4, use_cache=False))
