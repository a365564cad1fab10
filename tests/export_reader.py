"""Reads checkpoints written by export_merged the way a serving user would: stock transformers,
safetensors and torch only, in a process where `import mlan_kernels` fails (run by
tests/test_export.py). Usage: python export_reader.py CASES.json RESULTS.json

CASES.json: [{"name", "kind": "causal_lm" | "vision" | "lavin_image", "dir", "tensors"}]; the
tensors file holds the inputs and the expected outputs the parent process computed with the
adapted model. RESULTS.json: {"mlan_kernels_importable": bool, name: {"max_error", "loading",
"config", "same_generation" (greedy generate equal to the parent's, where it gave one)}}.
"""
import importlib.abc
import json
import os
import sys


class _Blocker(importlib.abc.MetaPathFinder):
    """Refuses every mlan_* package, wherever it is installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlan_kernels", "mlan_train", "mlan_bench"):
            raise ImportError(f"{name} is blocked in this process")
        return None


sys.meta_path.insert(0, _Blocker())

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402


def _load(builder, directory):
    model, info = builder.from_pretrained(directory, attn_implementation="eager", output_loading_info=True)
    loading = {key: sorted(map(str, value)) for key, value in info.items() if value}
    loading["class"] = type(model).__name__
    return model.eval(), loading


def _config(directory):
    with open(os.path.join(directory, "config.json")) as handle:
        config = json.load(handle)
    return {key: config.get(key) for key in ("model_type", "attention_bias", "mlp_bias")}


def _lavin_image(directory, tensors):
    """LaVIN's image tokens from the exported tower and neck, then the decoder (README.md there)."""
    llama, loading = _load(AutoModelForCausalLM, os.path.join(directory, "llama"))
    tower, tower_loading = _load(AutoModel, os.path.join(directory, "clip"))
    loading["class"] += " + " + tower_loading.pop("class")
    loading.update({f"clip {key}": value for key, value in tower_loading.items()})
    neck_path = os.path.join(directory, "lavin_neck.safetensors")
    neck = load_file(neck_path)
    with safe_open(neck_path, "pt") as handle:
        every = int(handle.metadata()["clip_every"])
    hidden = tower(pixel_values=tensors["pixel_values"], output_hidden_states=True).hidden_states
    cls = torch.stack([hidden[i][:, 0] for i in range(every, len(hidden), every)], 1)
    down = torch.nn.functional.silu(cls @ neck["neck.down.weight"].T + neck["neck.down.bias"])
    image_tokens = down @ neck["neck.up.weight"].T + neck["neck.up.bias"]
    embeds = torch.cat([image_tokens, llama.get_input_embeddings()(tensors["input_ids"])], 1)
    return llama(inputs_embeds=embeds).logits, loading, _config(os.path.join(directory, "llama"))


@torch.no_grad()
def run(case):
    tensors = load_file(case["tensors"])
    same_generation = None
    if case["kind"] == "lavin_image":
        output, loading, config = _lavin_image(case["dir"], tensors)
    elif case["kind"] == "causal_lm":
        model, loading = _load(AutoModelForCausalLM, case["dir"])
        output, config = model(tensors["input_ids"]).logits, _config(case["dir"])
        if "generated" in tensors:
            generated = model.generate(tensors["input_ids"], max_new_tokens=6, do_sample=False)
            same_generation = torch.equal(generated, tensors["generated"])
    elif case["kind"] == "vision_language":
        from transformers import AutoModelForImageTextToText
        model, loading = _load(AutoModelForImageTextToText, case["dir"])
        inputs = {key: tensors[key] for key in ("input_ids", "attention_mask", "pixel_values") if key in tensors}
        output = model(**inputs).logits[tensors["attention_mask"].bool()]
        with open(os.path.join(case["dir"], "config.json")) as handle:
            text_config = json.load(handle)["text_config"]
        config = {key: text_config.get(key) for key in ("model_type", "attention_bias", "mlp_bias")}
    else:
        model, loading = _load(AutoModel, case["dir"])
        output, config = model(pixel_values=tensors["pixel_values"]).last_hidden_state, _config(case["dir"])
    error = (output - tensors["expected"]).abs().max().item()
    result = {"max_error": error, "loading": loading, "config": config}
    return result | ({"same_generation": same_generation} if "generated" in tensors else {})


def main(cases_path, results_path):
    try:
        import mlan_kernels  # noqa: F401
        importable = True
    except ImportError:
        importable = False
    with open(cases_path) as handle:
        cases = json.load(handle)
    results = {"mlan_kernels_importable": importable}
    results.update({case["name"]: run(case) for case in cases})
    with open(results_path, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
