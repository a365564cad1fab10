"""patch_llama / patch_clip_vision / unpatch on tiny random HuggingFace models (CPU, no downloads):
identity at init, bit-identical unpatch, `unpatched` for save_pretrained, idempotence, freezing, backends, gradient
checkpointing, torch.compile, dtype moves, KV-cache generation, merge/unmerge."""
import pytest
import torch

from mlan_kernels.integrations import (AdaptedNorm, adapters, is_merged, merge_adapters,
                                       patch_clip_vision, patch_llama, record_routing_weights,
                                       set_backend, unmerge_adapters, unpatch, unpatched)
from mlan_kernels.integrations.extras import preferred_attn_implementation
from mlan_kernels.integrations.hf_compat import enable_gradient_checkpointing
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama

from helpers import HAS_TRITON, randomize_adapters  # noqa: F401  (re-exported to the other test modules)


def token_ids(batch=2, length=7, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, ids, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)                        # same dropout masks in every compared run
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_beam_search_with_kv_cache_equals_recomputation():
    """Beam search expands each prompt to num_beams rows before prefill and reorders rows
    only among the beams of one prompt, which share the routing token: the cached routing
    weights stay right (README: "Patch a HuggingFace model")."""
    model = randomize_adapters(patch_llama(tiny_llama(), placement="block"))
    ids = token_ids(batch=2, length=5, seed=4)
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    assert model.model.layers[0].input_layernorm.cached_routing_weights.shape == (6, 2)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize("placement", ["attn", "block"])
def test_identity_at_init_and_unpatch_is_bit_identical(placement):
    model, ids = tiny_llama(), token_ids()
    base = model(ids).logits
    norm = model.model.layers[0].input_layernorm
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    patch_llama(model, placement=placement)
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, AdaptedNorm) and layer.input_layernorm.norm is norm
    assert isinstance(layer.post_attention_layernorm, AdaptedNorm) == (placement == "block")
    assert len(adapters(model)) == 2 * (2 if placement == "block" else 1)
    assert torch.equal(model(ids).logits, base)                  # zero up-projections: identity
    randomize_adapters(model)
    assert not torch.allclose(model(ids).logits, base)
    unpatch(model)
    assert model.model.layers[0].input_layernorm is norm
    assert not any(isinstance(m, AdaptedNorm) for m in model.modules())
    assert torch.equal(model(ids).logits, base)
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}


def test_save_pretrained_inside_unpatched_writes_the_base(tmp_path):
    """with unpatched(model): save_pretrained -> the base's keys, reloadable as the base; on exit
    the same adapters are back (outputs, trainability, identity of the modules)."""
    from transformers import LlamaForCausalLM
    model, ids = tiny_llama(), token_ids()
    base_logits, base_keys = model(ids).logits, set(model.state_dict())
    patch_llama(model, placement="block")
    randomize_adapters(model)
    patched_logits, before = model(ids).logits, dict(adapters(model))
    with unpatched(model) as inner:
        assert inner is model and set(model.state_dict()) == base_keys
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
        model.save_pretrained(tmp_path)
    assert adapters(model) == before and all(a.up.weight.requires_grad for a in before.values())
    torch.testing.assert_close(model(ids).logits, patched_logits, rtol=0, atol=0)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(reloaded(ids).logits, base_logits, rtol=0, atol=0)


def test_unpatched_refuses_merged_adapters():
    model, ids = tiny_llama(), token_ids()
    patch_llama(model)
    randomize_adapters(model)
    merge_adapters(model, torch.tensor([1.0, 0.0]))
    with pytest.raises(RuntimeError, match="call unmerge_adapters"):
        with unpatched(model):
            pass
    unmerge_adapters(model)
    with unpatched(model):
        assert not any(isinstance(m, AdaptedNorm) for m in model.modules())
    assert any(isinstance(m, AdaptedNorm) for m in model.modules())


def test_patch_is_idempotent_and_rejects_other_hyperparameters():
    model = tiny_llama()
    patch_llama(model, rank=8)
    first = dict(adapters(model))
    patch_llama(model, rank=8)
    assert adapters(model) == first and not isinstance(model.model.layers[0].input_layernorm.norm, AdaptedNorm)
    with pytest.raises(ValueError, match="already patched"):
        patch_llama(model, rank=4)
    unpatch(model)
    patch_llama(model, rank=4)
    assert next(iter(adapters(model).values())).rank == 4


def test_frozen_base_gets_no_gradients_and_adapters_do():
    model = randomize_adapters(patch_llama(tiny_llama()))
    model.train()
    _, grads = loss_and_grads(model, token_ids())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in name for name in trainable)
    assert set(grads) == trainable
    assert all(grad.abs().sum() > 0 for grad in grads.values())


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (interpreter on CPU)")
def test_triton_backend_matches_reference_on_the_whole_model():
    model = randomize_adapters(patch_llama(tiny_llama(), placement="block")).train()
    ids = token_ids()
    set_backend(model, "reference")
    loss_ref, grads_ref = loss_and_grads(model, ids)
    set_backend(model, "triton")
    loss_tri, grads_tri = loss_and_grads(model, ids)
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads_tri.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_tri[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    """Frozen base (no checkpointed input requires grad) and dropout (the replay must draw the
    same mask): the non-reentrant checkpointing that enable_gradient_checkpointing turns on."""
    model = randomize_adapters(patch_llama(tiny_llama(), dropout_p=0.1)).train()
    ids = token_ids()
    loss_plain, grads_plain = loss_and_grads(model, ids)
    enable_gradient_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    loss_ckpt, grads_ckpt = loss_and_grads(model, ids)
    assert torch.equal(loss_ckpt, loss_plain)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_torch_compile_of_patched_model_runs_and_matches_eager():
    model = randomize_adapters(patch_llama(tiny_llama(), dropout_p=0.0))
    ids = token_ids()
    eager = model(ids, use_cache=False).logits
    compiled = torch.compile(model, backend="aot_eager")
    logits = compiled(ids, use_cache=False).logits
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
    logits.sum().backward()
    assert all(a.down.weight.grad is not None for a in adapters(model).values())


def test_survives_dtype_and_device_moves():
    model = randomize_adapters(patch_llama(tiny_llama()))
    model.to(torch.bfloat16)
    adapter = next(iter(adapters(model).values()))
    assert adapter.down.weight.dtype == torch.bfloat16
    out = model(token_ids(), output_hidden_states=True)     # transformers 4.x upcasts logits
    assert out.hidden_states[-1].dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


def test_generate_with_kv_cache_uses_prefill_routing():
    model = randomize_adapters(patch_llama(tiny_llama(), placement="block"))
    ids = token_ids(batch=2, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True,
                  pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    norm = model.model.layers[1].input_layernorm
    assert norm.phase == "decode" and norm.cached_routing_weights.shape == (2, 2)
    recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step_cached, step_full in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(step_cached, step_full, rtol=1e-4, atol=1e-5)
    # A new prompt is a new prefill: the cache is replaced, not reused.
    other = token_ids(batch=1, length=4, seed=3)
    model.generate(other, use_cache=True, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert norm.cached_routing_weights.shape == (1, 2)


@pytest.mark.parametrize("placement", ["attn", "block"])
def test_merge_and_unmerge(placement):
    model = randomize_adapters(patch_llama(tiny_llama(), placement=placement))
    ids = token_ids(batch=1)
    with record_routing_weights(model) as recorder:
        reference = model(ids).logits
    weights_before = {name: p.detach().clone() for name, p in model.named_parameters()
                      if ".adapter." not in name}
    merge_adapters(model, recorder.weights)
    assert is_merged(model) and not any(isinstance(m, AdaptedNorm) for m in model.modules())
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    assert not is_merged(model) and model.model.layers[0].self_attn.q_proj.bias is None
    after = {name: p for name, p in model.named_parameters() if ".adapter." not in name}
    assert all(torch.equal(after[name], weights_before[name]) for name in weights_before)
    assert torch.equal(model(ids).logits, reference)


def test_merge_rejects_mixed_routing_and_explicit_vector_merges():
    model = randomize_adapters(patch_llama(tiny_llama()))
    with pytest.raises(ValueError, match="differ between samples"):
        merge_adapters(model, torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
    weights = torch.tensor([0.3, 0.7])
    ids = token_ids(batch=2)
    with torch.no_grad():          # a router that ignores its input: softmax(log(w)) = w everywhere
        for adapter in adapters(model).values():
            adapter.router.weight.zero_()
            adapter.router.bias.copy_(weights.log() * adapter.temperature)
    expected = model(ids).logits
    merge_adapters(model, weights)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    unpatch(model)                       # unpatch also unmerges
    assert model.model.layers[0].self_attn.q_proj.bias is None


@pytest.mark.parametrize("placement", ["attn", "block"])
def test_clip_patch_identity_per_image_routing_and_merge(placement):
    clip = tiny_clip()
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    base = clip(pixel_values=pixels).last_hidden_state
    patch_clip_vision(clip, placement=placement)
    assert torch.equal(clip(pixel_values=pixels).last_hidden_state, base)
    randomize_adapters(clip)
    batch = clip(pixel_values=pixels).last_hidden_state
    alone = clip(pixel_values=pixels[2:]).last_hidden_state
    torch.testing.assert_close(batch[2:], alone, rtol=1e-5, atol=1e-5)   # routed by its own CLS
    with record_routing_weights(clip) as recorder:
        reference = clip(pixel_values=pixels[:1]).last_hidden_state
    merge_adapters(clip, recorder.weights)
    torch.testing.assert_close(clip(pixel_values=pixels[:1]).last_hidden_state, reference,
                               rtol=1e-4, atol=1e-5)
    unpatch(clip)
    assert torch.equal(clip(pixel_values=pixels).last_hidden_state, base)


def test_preferred_attn_implementation_never_requires_flash_attn():
    assert preferred_attn_implementation("cpu") == "sdpa"
    model = patch_llama(tiny_llama(attn_implementation=preferred_attn_implementation("cpu")))
    assert torch.isfinite(model(token_ids()).logits).all()
