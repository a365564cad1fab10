"""What `load_adapters` checks in a save_adapters directory before it touches a model, on the
files alone: every error is one line that starts with the file and names the key at fault
(FileNotFoundError for a missing file, ValueError for everything else); a good directory reads
back as written."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from mlan_kernels.integrations.checkpoint_validation import (check_against_model, read_adapter_config,
                                                read_adapter_tensors)
from mlan_kernels.config import AdapterConfig

RECORD = dict(rank=8, experts=2, groups=2, scale=1, temperature=10.0, dropout_p=0.1,
              placement="attn", hidden_size=32)
# what each number field accepts, as AdapterConfig's check says it
EXPECTED = {"scale": "a finite number", "temperature": "finite and > 0",
            "dropout_p": "finite and in [0, 1)"}


def config_file(tmp_path, content):
    path = tmp_path / "adapter_config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def config_error(tmp_path, content):
    """The message read_adapter_config raises for `content`, without the leading path."""
    path = config_file(tmp_path, content)
    with pytest.raises(ValueError) as error:
        read_adapter_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: "):]


def test_a_good_config_reads_back_its_components(tmp_path):
    legacy = {key if key != "dropout_p" else "dropout": value for key, value in RECORD.items()}
    components = {"llama": dict(RECORD), "clip": dict(legacy, hidden_size=48, placement="block")}
    path = config_file(tmp_path, {"components": components, "mlan_kernels_version": "0.1"})
    settings = {key: value for key, value in RECORD.items() if key != "hidden_size"}
    assert read_adapter_config(path) == {     # a file without modality_routing: written without it
        "llama": {"config": AdapterConfig(**settings), "hidden_size": 32, "modality_routing": False},
        "clip": {"config": AdapterConfig(**dict(settings, placement="block")), "hidden_size": 48,
                 "modality_routing": False}}


def test_modality_routing_must_be_a_bool(tmp_path):
    record = dict(RECORD, modality_routing="yes")
    assert config_error(tmp_path, {"components": {"llama": record}}) == \
        "components['llama']['modality_routing']: expected true or false, got 'yes'"


def test_a_missing_or_unreadable_config_file(tmp_path):
    missing = tmp_path / "adapter_config.json"
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(missing))}: no adapter config "
                                                r"\(expected a save_adapters directory\)$"):
        read_adapter_config(missing)
    assert config_error(tmp_path, "{").startswith("not a JSON adapter config (JSONDecodeError: ")
    assert config_error(tmp_path, "[" * 100_000).startswith(
        "not a JSON adapter config (RecursionError: ")
    assert config_error(tmp_path, [1, 2]) == "expected a JSON object, got list"


@pytest.mark.parametrize("components", [None, {}, [dict(RECORD)], "llama"])
def test_components_must_be_a_non_empty_object(tmp_path, components):
    content = {} if components is None else {"components": components}
    assert config_error(tmp_path, content) == (
        "key 'components' must be a non-empty object {component: hyperparameters}, "
        f"got {components!r:.80}")


def test_a_long_components_value_is_cut_in_the_message(tmp_path):
    message = config_error(tmp_path, {"components": ["x" * 200]})
    assert message.endswith("got " + repr(["x" * 200])[:80])


def test_each_component_is_a_known_name_with_an_object_of_every_field(tmp_path):
    assert config_error(tmp_path, {"components": {"vit": dict(RECORD)}}) == \
        "components['vit']: unknown component; expected one of ['llama', 'clip']"
    assert config_error(tmp_path, {"components": {"clip": [1]}}) == \
        "components['clip']: expected an object, got list"
    partial = {key: value for key, value in RECORD.items() if key not in ("groups", "hidden_size")}
    assert config_error(tmp_path, {"components": {"llama": partial}}) == \
        "components['llama']: missing field(s) ['groups', 'hidden_size']"


@pytest.mark.parametrize("key", ["rank", "experts", "groups", "hidden_size"])
@pytest.mark.parametrize("value", [True, 8.0, "8", None, 0])
def test_integer_fields_must_be_positive_ints(tmp_path, key, value):
    record = dict(RECORD, **{key: value})
    expected = (f"components['llama']['hidden_size']: expected a positive int, got {value!r}"
                if key == "hidden_size" else
                f"components['llama']: {key} must be a positive int, got {value!r}")
    assert config_error(tmp_path, {"components": {"llama": record}}) == expected


@pytest.mark.parametrize("key", ["scale", "temperature", "dropout_p"])
@pytest.mark.parametrize("value", [False, "1.0", None])
def test_number_fields_must_be_numbers(tmp_path, key, value):
    record = dict(RECORD, **{key: value})
    assert config_error(tmp_path, {"components": {"llama": record}}) == \
        f"components['llama']: {key} must be {EXPECTED[key]}, got {value!r}"


@pytest.mark.parametrize("key", ["scale", "temperature", "dropout_p"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_number_fields_must_be_finite(tmp_path, key, value):
    content = json.dumps({"components": {"llama": dict(RECORD, **{key: 0.5})}})
    content = content.replace(f'"{key}": 0.5', f'"{key}": {value}')
    assert config_error(tmp_path, content) == \
        f"components['llama']: {key} must be {EXPECTED[key]}, got {float(value)!r}"


def tensors_file(tmp_path, tensors):
    path = tmp_path / "adapter_model.safetensors"
    save_file(tensors, str(path))
    return path


def test_good_tensors_read_back_exactly(tmp_path):
    tensors = {"a": torch.randn(3, 2), "b": torch.randn(4, dtype=torch.float64).to(torch.bfloat16)}
    read = read_adapter_tensors(tensors_file(tmp_path, tensors))
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)


def test_missing_unreadable_and_bad_tensors(tmp_path):
    missing = tmp_path / "adapter_model.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(missing))}: no adapter weights "
                                                r"\(expected a save_adapters directory\)$"):
        read_adapter_tensors(missing)
    path = tensors_file(tmp_path, {"a": torch.randn(64)})
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: unreadable safetensors file "
                                         r"\(SafetensorError: "):
        read_adapter_tensors(path)
    path = tensors_file(tmp_path, {"a": torch.randn(2), "b": torch.arange(3)})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: tensor 'b' has dtype "
                                         r"torch\.int64; adapter weights must be floating point$"):
        read_adapter_tensors(path)
    for bad in (float("nan"), float("inf"), -float("inf")):
        path = tensors_file(tmp_path, {"a": torch.randn(2), "b": torch.tensor([1.0, bad])})
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: tensor 'b' holds "
                                             r"non-finite values \(nan or inf\)$"):
            read_adapter_tensors(path)


def test_names_and_shapes_must_match_the_model():
    targets = {f"t{i:02d}": torch.zeros(2, 3) for i in range(12)}
    check_against_model("f", {name: torch.ones(2, 3) for name in targets}, targets)
    with pytest.raises(ValueError) as error:
        check_against_model("f", {"t00": torch.ones(2, 3), "z1": torch.ones(1), "z0": torch.ones(1)},
                            targets)
    assert str(error.value) == ("f: adapter tensors do not match the model: missing "
                                f"{[f't{i:02d}' for i in range(1, 9)]}, unexpected ['z0', 'z1']")
    extra = {f"z{i:02d}": torch.ones(1) for i in range(10)}
    with pytest.raises(ValueError) as error:                       # only unexpected names
        check_against_model("f", {**targets, **extra}, targets)
    assert str(error.value) == ("f: adapter tensors do not match the model: missing [], "
                                f"unexpected {[f'z{i:02d}' for i in range(8)]}")
    with pytest.raises(ValueError) as error:                       # only missing names
        check_against_model("f", {"t11": torch.ones(2, 3)}, targets)
    assert str(error.value) == ("f: adapter tensors do not match the model: missing "
                                f"{[f't{i:02d}' for i in range(8)]}, unexpected []")
    with pytest.raises(ValueError) as error:
        check_against_model("f", {**targets, "t05": torch.ones(3, 2)}, targets)
    assert str(error.value) == "f: tensor 't05' has shape [3, 2], the model's is [2, 3]"


def test_the_smallest_hidden_size_is_one(tmp_path):
    path = config_file(tmp_path, {"components": {"llama": dict(RECORD, hidden_size=1)}})
    assert read_adapter_config(path)["llama"]["hidden_size"] == 1
