"""export_merged: a patched model merged for one modality, read back by stock transformers in a
process where mlan_kernels cannot be imported (tests/export_reader.py), with the adapted model's
outputs (fp32, 1e-5); the model is left as it was; a failing save leaves nothing behind;
families that cannot declare the merged biases are refused; save_pretrained on a patched model
raises instead of writing an incomplete checkpoint."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import mlan_kernels as mk
from mlan_kernels.integrations import adapters, is_merged, record_routing_weights
from mlan_kernels.integrations.export import routing_weights_for
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama, tiny_model

READER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_reader.py")
TOLERANCE = 1e-5
PIXELS = 28


def randomized(model):
    """Non-zero up and down biases and up weights, a strong router (routing far from uniform)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in adapters(model).values():
            for parameter in (adapter.up.weight, adapter.up.bias, adapter.down.bias):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            adapter.router.weight.copy_(torch.randn(adapter.router.weight.shape, generator=generator) * 3)
    return model


def snapshot(model):
    """Everything export_merged must leave as it was: weights (bit-exact), flags, module types."""
    return ({name: value.clone() for name, value in model.state_dict().items()},
            {name: p.requires_grad for name, p in model.named_parameters()},
            [(name, type(module).__name__, module.training) for name, module in model.named_modules()])


def assert_unchanged(model, before):
    weights, flags, modules = snapshot(model)
    assert weights.keys() == before[0].keys()
    assert all(torch.equal(weights[name], before[0][name]) for name in weights)
    assert (flags, modules) == before[1:]
    assert not is_merged(model)


def ids_from_bos(model):
    return torch.tensor([[model.config.bos_token_id, 5, 17, 9, 23, 40, 3]])


def decoder(kind, placement):
    try:
        model = tiny_model(kind, **({"attention_bias": False} if kind == "llama" else {}))
    except ValueError as error:                 # a family this transformers release lacks
        pytest.skip(str(error))
    return randomized(mk.patch(model, placement=placement))


@torch.no_grad()
def export_decoder(kind, placement, directory):
    model = decoder(kind, placement)
    ids = ids_from_bos(model)
    expected = model(ids).logits
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)    # KV cache, prefill routing
    with mk.unpatched(model):
        base = model(ids).logits
    before = snapshot(model)
    record = mk.export_merged(model, directory / "model", "text")
    assert_unchanged(model, before)
    assert record == json.loads((directory / "model" / "mlan_export.json").read_text())
    assert record["routing"] == f"BOS token {model.config.bos_token_id}"
    tensors = {"input_ids": ids, "expected": expected, "generated": generated}
    return tensors, (expected - base).abs().max().item(), "causal_lm", "model"


@torch.no_grad()
def export_tower(kind, directory):
    model = randomized(mk.patch(tiny_model(kind), placement="block"))
    pixels = torch.randn(1, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(3))
    expected = model(pixel_values=pixels).last_hidden_state
    with mk.unpatched(model):
        base = model(pixel_values=pixels).last_hidden_state
    mk.export_merged(model, directory / "model", "image", pixel_values=pixels)
    return {"pixel_values": pixels, "expected": expected}, (expected - base).abs().max().item(), "vision", "model"


@torch.no_grad()
def export_lavin(modality, directory):
    lavin = randomized(mk.build_lavin(tiny_llama(attention_bias=False), tiny_clip(), placement="block"))
    lavin.modality_embedding.weight.normal_(generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[1, 5, 17, 9, 23]])
    pixels = torch.randn(1, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(3))
    has_image = torch.tensor([modality == "image"])
    expected = lavin(ids, pixels, has_image).logits[:, 1:]     # the modality token is not served
    record = mk.export_merged(lavin, directory / "model", modality, pixel_values=pixels)
    assert record["routing"] == {"text": "modality token",
                                 "image": "modality token; vision tower: 1 calibration image(s)"}[modality]
    assert sorted(record["parts"]) == (["clip", "llama"] if modality == "image" else ["llama"])
    with mk.unpatched(lavin):
        base = lavin(ids, pixels, has_image).logits[:, 1:]
    tensors = {"input_ids": ids, "expected": expected} | ({"pixel_values": pixels} if modality == "image" else {})
    kind, served = ("lavin_image", "model") if modality == "image" else ("causal_lm", "model/llama")
    return tensors, (expected - base).abs().max().item(), kind, served


def export_vision_language(modality, directory):
    """A whole LLaVA (both sides patched, modality routing) merged for one modality; the served
    batch holds one sample of that modality (an image sample with its placeholders and pixels)."""
    from mlan_kernels.integrations.tiny import tiny_image, tiny_vision_language_inputs, tiny_vision_language_model
    llava = tiny_vision_language_model("llava")
    base_inputs = None
    mk.patch(llava, placement="attn")
    randomized(llava)
    image = tiny_image("llava", torch.Generator().manual_seed(5))
    sample = ([5, 6, 7], image if modality == "image" else None)
    inputs = tiny_vision_language_inputs("llava", [sample])
    with torch.no_grad():
        expected = llava(**inputs).logits[inputs["attention_mask"].bool()]
        with mk.unpatched(llava):
            base_inputs = llava(**inputs).logits[inputs["attention_mask"].bool()]
    record = mk.export_merged(llava, directory / "model", modality, pixel_values=image[None])
    assert record["routing"] == "modality embedding; vision tower: 1 calibration image(s)"
    tensors = {**inputs, "expected": expected}
    return tensors, (expected - base_inputs).abs().max().item(), "vision_language", "model"


CASES = {
    "llava-text": lambda d: export_vision_language("text", d),
    "llava-image": lambda d: export_vision_language("image", d),
    "llama-attn": lambda d: export_decoder("llama", "attn", d),
    "llama-block": lambda d: export_decoder("llama", "block", d),
    "qwen2-attn": lambda d: export_decoder("qwen2", "attn", d),
    "qwen3-attn": lambda d: export_decoder("qwen3", "attn", d),
    "gemma-attn": lambda d: export_decoder("gemma", "attn", d),
    "gemma2-attn": lambda d: export_decoder("gemma2", "attn", d),
    "gemma3_text-attn": lambda d: export_decoder("gemma3_text", "attn", d),
    "clip-block": lambda d: export_tower("clip_vision_model", d),
    "siglip-block": lambda d: export_tower("siglip_vision_model", d),
    "lavin-text": lambda d: export_lavin("text", d),
    "lavin-image": lambda d: export_lavin("image", d),
}
SERVED_CLASSES = {"llava": "LlavaForConditionalGeneration", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                  "clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "lavin-text": "LlamaForCausalLM",
                  "lavin-image": "LlamaForCausalLM + CLIPVisionModel"}
EXPECTED_CONFIG = {"llava-text": (True, False), "llava-image": (True, False), "llama-attn": (True, False), "llama-block": (True, True), "qwen3-attn": (True, None),
                   "gemma-attn": (True, None), "lavin-text": (True, True), "lavin-image": (True, True)}


@pytest.fixture(scope="module")
def read_back(tmp_path_factory):
    """Export every case, then read all of them in one process without mlan_kernels."""
    root = tmp_path_factory.mktemp("exports")
    cases, adapter_effect = [], {}
    for name, export in CASES.items():
        directory = root / name
        directory.mkdir()
        try:
            tensors, adapter_effect[name], kind, served = export(directory)
        except pytest.skip.Exception:
            continue
        save_file({key: value.contiguous() for key, value in tensors.items()}, directory / "tensors.safetensors")
        cases.append({"name": name, "kind": kind, "dir": str(directory / served),
                      "tensors": str(directory / "tensors.safetensors")})
    (root / "cases.json").write_text(json.dumps(cases))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, READER, str(root / "cases.json"), str(root / "results.json")],
                            capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / "results.json").read_text()), adapter_effect


def test_the_reader_process_cannot_import_mlan_kernels(read_back):
    assert read_back[0]["mlan_kernels_importable"] is False


@pytest.mark.parametrize("name", sorted(CASES))
def test_stock_transformers_reads_the_export_with_the_adapted_outputs(read_back, name):
    results, adapter_effect = read_back
    if name not in results:
        pytest.skip(f"{name}: model type missing from this transformers release")
    result = results[name]
    assert set(result["loading"]) == {"class"}, result["loading"]      # nothing missing or unexpected
    assert result["loading"]["class"] == SERVED_CLASSES.get(name, SERVED_CLASSES.get(name.split("-")[0]))
    assert adapter_effect[name] > 100 * TOLERANCE                      # the adapters change the outputs
    assert result["max_error"] <= TOLERANCE, result
    decoder_case = not name.startswith(("clip", "siglip", "lavin", "llava"))
    assert result.get("same_generation") is (True if decoder_case else None)   # greedy generate, KV cache
    if name in EXPECTED_CONFIG:
        assert (result["config"]["attention_bias"], result["config"]["mlp_bias"]) == EXPECTED_CONFIG[name]


@pytest.mark.parametrize("kind, placement", [("mistral", "attn"), ("phi3", "attn"), ("qwen2", "block"),
                                             ("gemma", "block")])
def test_families_without_a_bias_for_the_merge_are_refused(tmp_path, kind, placement):
    model = decoder(kind, placement)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"model_type '{kind}' cannot be exported merged") as error:
        mk.export_merged(model, tmp_path / "out", "text")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    assert_unchanged(model, before)


def test_a_failing_save_leaves_no_directory_and_the_model_as_it_was(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM
    model = decoder("llama", "block").train()
    before = snapshot(model)

    def broken_save(self, directory, **options):
        os.makedirs(directory, exist_ok=True)
        open(os.path.join(directory, "config.json"), "w").close()    # half written
        raise OSError("disk full")
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        mk.export_merged(model, tmp_path / "out", "text")
    assert os.listdir(tmp_path) == []                                  # no out_dir, no scratch
    assert_unchanged(model, before)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept").write_text("old")
    with pytest.raises(ValueError, match="exists"):
        mk.export_merged(model, tmp_path / "out", "text")
    with pytest.raises(OSError, match="disk full"):
        mk.export_merged(model, tmp_path / "out", "text", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["kept"]
    monkeypatch.undo()
    mk.export_merged(model, tmp_path / "out", "text", overwrite=True)
    assert "kept" not in os.listdir(tmp_path / "out") and "model.safetensors" in os.listdir(tmp_path / "out")
    assert_unchanged(model, before)


@torch.no_grad()
def test_a_decoder_routes_by_its_bos_token(tmp_path):
    model = decoder("llama", "attn")
    weights = routing_weights_for(model, "text")
    adapter = adapters(model)["llama.layers.0.attn"]
    normed = model.model.layers[0].input_layernorm.norm(model.model.embed_tokens.weight[1])   # BOS = 1
    by_hand = torch.softmax((adapter.router.weight @ normed + adapter.router.bias) / adapter.temperature, -1)
    torch.testing.assert_close(weights["llama.layers.0.attn"], by_hand)
    with record_routing_weights(model) as recorder:                  # position 0 of a longer input
        model(ids_from_bos(model))
    for key, value in recorder.weights.items():
        torch.testing.assert_close(weights[key], value[0])
    assert not torch.allclose(routing_weights_for(model, "text", bos_token_id=7)["llama.layers.1.attn"],
                              weights["llama.layers.1.attn"])


@pytest.mark.parametrize("call, message", [
    (lambda m, t: routing_weights_for(m, "image"), "modality must be one of \\['text'\\]"),
    (lambda m, t: mk.export_merged(m, t, "text", bos_token_id="<s>"), "bos_token_id must be an int"),
    (lambda m, t: routing_weights_for(tiny_clip_patched(), "image"), "pixel_values is required"),
    (lambda m, t: mk.export_merged(mk.unpatch(m), t, "text"), "has no MM-Adapters"),
    (lambda m, t: mk.export_merged(m, t, "audio"), "modality must be 'text' or 'image', got 'audio'"),
])
def test_bad_calls_are_one_line_errors(tmp_path, call, message):
    with pytest.raises(ValueError, match=message) as error:
        call(decoder("llama", "attn"), tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def tiny_clip_patched():
    return mk.patch(tiny_clip())


def test_explicit_weights_are_used_as_given(tmp_path):
    model = decoder("llama", "attn")
    uniform = torch.tensor([0.5, 0.5])
    record = mk.export_merged(model, tmp_path / "out", "text", weights=uniform)
    assert record["routing"] == "explicit"
    from transformers import LlamaForCausalLM
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = ids_from_bos(model)
    with torch.no_grad():
        mk.merge_adapters(model, uniform)
        expected = model(ids).logits
        mk.unmerge_adapters(model)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=TOLERANCE)


def test_save_pretrained_on_a_patched_model_raises_and_works_once_unpatched(tmp_path):
    from transformers import LlamaForCausalLM
    model = decoder("llama", "attn")
    with pytest.raises(RuntimeError, match="export_merged") as error:
        model.save_pretrained(tmp_path / "patched")
    assert "\n" not in str(error.value) and not (tmp_path / "patched").exists()
    with mk.unpatched(model):
        model.save_pretrained(tmp_path / "base")                    # the base, through the guard
    mk.merge_adapters(model, torch.tensor([0.5, 0.5]))
    with pytest.raises(RuntimeError, match="export_merged"):
        model.save_pretrained(tmp_path / "merged")                 # biases the config lacks
    mk.unmerge_adapters(model)
    copied = copy.deepcopy(model)                                  # the copy's guard guards the copy
    with pytest.raises(RuntimeError, match="export_merged"):
        copied.save_pretrained(tmp_path / "copied")
    with mk.unpatched(copied):
        copied.save_pretrained(tmp_path / "copied")
    mk.unpatch(model)
    assert "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path / "unpatched")
    ids = ids_from_bos(model)
    with torch.no_grad():
        for name in ("base", "unpatched", "copied"):
            reloaded = LlamaForCausalLM.from_pretrained(tmp_path / name, attn_implementation="eager")
            assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_the_llama_of_a_lavin_model_is_guarded_too(tmp_path):
    lavin = mk.build_lavin(tiny_llama(), tiny_clip())
    for part in (lavin.llama, lavin.clip):
        with pytest.raises(RuntimeError, match="save_adapters"):
            part.save_pretrained(tmp_path / "part")


@torch.no_grad()
def test_a_lavin_compat_text_export_serves_lavins_layout_and_its_image_side_is_refused(tmp_path):
    """compat="lavin": [modality | BOS | "Image: N/A" | text[1:]]; served as input_ids without the
    modality token. Its CLIP routes each token position apart: no merged tower holds that."""
    from transformers import LlamaForCausalLM
    lavin = randomized(mk.build_lavin(tiny_llama(attention_bias=False), tiny_clip(), compat="lavin",
                                      image_prefix_ids=[7, 8], text_prefix_ids=[7, 8, 9]))
    ids = torch.tensor([[1, 5, 17, 9, 23]])
    expected = lavin(ids, has_image=torch.tensor([False])).logits[:, 1:]   # truncated to 5, as LaVIN
    mk.export_merged(lavin, tmp_path / "text", "text")
    served = LlamaForCausalLM.from_pretrained(tmp_path / "text" / "llama", attn_implementation="eager")
    logits = served(torch.tensor([[1, 7, 8, 9, 5, 17, 9, 23]])).logits
    torch.testing.assert_close(logits[:, :expected.shape[1]], expected, rtol=0, atol=TOLERANCE)
    with pytest.raises(ValueError, match="route every token position"):
        mk.export_merged(lavin, tmp_path / "image", "image", pixel_values=torch.randn(1, 3, PIXELS, PIXELS))
    assert sorted(os.listdir(tmp_path)) == ["text"]
