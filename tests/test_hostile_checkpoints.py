"""Hostile checkpoint files: tensors claiming more elements than they store, compressed,
truncated, empty or pre-1.6 torch files, a config claiming huge adapters, FIFOs in place of
files, one CLIP adapter under two names. Each is refused with a one-line error before memory
grows with the claim, through the loader (load_lavin_adapters / load_adapters) and the
converter (mlan-convert, exit 2), and leaves the model as it was."""
import json
import re
import os
import signal

import pytest
import torch

from mlan_kernels.integrations.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, load_adapters,
                                     load_lavin_adapters, save_adapters)
from mlan_kernels.integrations.convert import main as convert
from mlan_kernels.integrations import patch_state

from hostile_files import (claimed_tensor, expanded_tensor, peak_memory_growth, recompress,
                           truncate)
from lavin_reference import LavinTrainables, save_lavin_checkpoint
from test_integration_lavin import tiny_lavin

BOMB = 2 * 10**8              # elements: unchecked, the converter peaks over 1 GB on it


def lavin_state():
    """{LaVIN name: tensor} of a tiny LaVIN (tiny_lavin's shapes), DDP names."""
    lavin = LavinTrainables(32, 2, 32, 8, neck_hidden=16)
    return {f"module.{name}": p.data.clone() for name, p in lavin.named_parameters()}


def save_with(path, **entries):
    """A LaVIN training file whose state dict has `entries` added (name: tensor or claim)."""
    torch.save({"model": {**lavin_state(), **entries}, "epoch": 3}, path)
    return path


def convert_error(capsys, argv):
    code = convert(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mlan-convert: error: ") and err.count("\n") == 1, err
    return err


def snapshot(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_expanded_tensor_is_refused_by_the_converter_without_allocating_the_claim(tmp_path):
    path = save_with(tmp_path / "bomb.pth", **{"module.layers.0.adapter_attn.conv_A.weight":
                                               expanded_tensor(BOMB)})
    assert os.path.getsize(path) < 100_000
    probe = peak_memory_growth("from mlan_kernels.integrations.convert import main",
                               f"assert main(['lavin-to-hf', {str(path)!r}, 'out']) == 2", tmp_path)
    assert probe["outcome"] == "returned" and probe["grown_mb"] < 200, probe
    assert not (tmp_path / "out").exists()


def test_expanded_tensor_is_refused_by_load_lavin_adapters_without_allocating_the_claim(tmp_path):
    path = save_with(tmp_path / "bomb.pth", **{"module.adapter_modality_embedding.weight":
                                               expanded_tensor(BOMB)})
    probe = peak_memory_growth(
        "from mlan_kernels.integrations.checkpoint import load_lavin_adapters\n"
        "from test_integration_lavin import tiny_lavin\nmodel = tiny_lavin()",
        f"load_lavin_adapters(model, {str(path)!r})", tmp_path)
    assert probe["outcome"].startswith("ValueError: ") and "expanded tensor" in probe["outcome"]
    assert probe["grown_mb"] < 200, probe


def test_expanded_tensor_message_names_the_file_and_the_key(tmp_path, capsys):
    path = save_with(tmp_path / "bomb.pth", **{"module.layers.0.adapter_attn.conv_A.weight":
                                               expanded_tensor(1000)})
    err = convert_error(capsys, ["lavin-to-hf", str(path), str(tmp_path / "out")])
    assert "'model']['module.layers.0.adapter_attn.conv_A.weight']: expanded tensor (shape [1000], " \
           "strides [0])" in err
    model = tiny_lavin()
    before = snapshot(model)
    with pytest.raises(ValueError, match="expanded tensor"):
        load_lavin_adapters(model, path)
    assert_unchanged(model, before)


def test_an_in_memory_state_dict_with_an_expanded_tensor_is_refused_too():
    state = lavin_state()
    state["module.adapter_modality_embedding.weight"] = torch.zeros(1).expand(BOMB)
    with pytest.raises(ValueError, match=r"checkpoint dict: key 'module.adapter_modality_embedding."
                                         r"weight': expanded tensor"):
        load_lavin_adapters(tiny_lavin(), {"model": state})


def test_overlapping_strides_are_refused(tmp_path, capsys):
    """1000 x 1000 elements over a 2000-element storage (strides 1, 1): a million claimed."""
    path = save_with(tmp_path / "overlap.pth", **{"module.adapter_modality_embedding.weight":
                                                  claimed_tensor((1000, 1000), (1, 1), stored=2000)})
    err = convert_error(capsys, ["lavin-to-hf", str(path), str(tmp_path / "out")])
    assert "claims 1000000 elements, its storage holds 2000 (overlapping strides)" in err
    with pytest.raises(ValueError, match="overlapping strides"):
        load_lavin_adapters(tiny_lavin(), path)


def test_a_storage_shorter_than_the_claim_is_a_one_line_error(tmp_path, capsys):
    path = save_with(tmp_path / "short.pth", **{"module.adapter_modality_embedding.weight":
                                                claimed_tensor((10**8,), (1,), stored=4)})
    err = convert_error(capsys, ["lavin-to-hf", str(path), str(tmp_path / "out")])
    assert f"{path}: unreadable torch file" in err
    with pytest.raises(ValueError, match="unreadable torch file"):
        load_lavin_adapters(tiny_lavin(), path)


def test_compressed_records_are_refused(tmp_path, capsys):
    """torch.save never compresses; a deflated record can inflate far beyond the file."""
    path = save_with(tmp_path / "deflated.pth")
    recompress(path)
    err = convert_error(capsys, ["lavin-to-hf", str(path), str(tmp_path / "out")])
    assert "compressed record" in err and "torch.save stores records uncompressed" in err
    with pytest.raises(ValueError, match="compressed record"):
        load_lavin_adapters(tiny_lavin(), path)


@pytest.mark.parametrize("damage", ["empty", "truncated", "legacy"])
def test_empty_truncated_and_pre_zip_files_are_one_line_errors(tmp_path, capsys, damage):
    path = tmp_path / "checkpoint.pth"
    if damage == "legacy":
        torch.save({"model": lavin_state()}, path, _use_new_zipfile_serialization=False)
    else:
        save_with(path)
        truncate(path, keep=0.0 if damage == "empty" else 0.6)
    expected = "empty file (0 bytes)" if damage == "empty" else "not a complete torch.save zip file"
    err = convert_error(capsys, ["lavin-to-hf", str(path), str(tmp_path / "out")])
    assert expected in err
    model = tiny_lavin()
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_lavin_adapters(model, path)
    assert_unchanged(model, before)


def test_one_clip_adapter_under_both_names_is_refused(tmp_path, capsys):
    """backbone.transformer.* and backbone.visual.transformer.* name the same CLIP block: two
    copies would silently resolve to one."""
    state = lavin_state()
    prefix = "module.backbone.visual.transformer.resblocks.0.adapter_attn."
    state.update({name.replace("visual.", ""): tensor + 1 for name, tensor in state.items()
                  if name.startswith(prefix)})
    message = ("clip.layers.0.attn is stored twice, as 'backbone.transformer.resblocks.0.adapter_attn.' "
               "and 'backbone.visual.transformer.resblocks.0.adapter_attn.'")
    model = tiny_lavin()
    before = snapshot(model)
    for strict in (True, False):
        with pytest.raises(ValueError, match=re.escape(message)):
            load_lavin_adapters(model, {"model": state}, strict=strict)
    assert_unchanged(model, before)
    path = tmp_path / "twice.pth"
    torch.save({"model": state}, path)
    assert message in convert_error(capsys, ["lavin-to-hf", str(path), str(tmp_path / "out")])


@pytest.mark.parametrize("field, value", [("experts", 2_000_000), ("rank", 4_000_000)])
def test_a_config_claiming_huge_adapters_is_refused_before_patching(tmp_path, field, value):
    save_adapters(tiny_lavin(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["components"]["clip"][field] = value
    if field == "rank":
        config["components"]["clip"]["groups"] = 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    model = tiny_lavin()
    from mlan_kernels.integrations import unpatch
    unpatch(model, "clip")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor 'clip\.layers\.0\.attn\."
                                         r"[a-z_.]+' has shape \[\d+(, \d+)*\], the adapters of .*"
                                         r"components\['clip'\] have \["):
        load_adapters(model, tmp_path)
    assert patch_state(model, "clip") is None
    assert_unchanged(model, before)


def test_a_config_claiming_two_million_experts_costs_no_memory(tmp_path):
    save_adapters(tiny_lavin(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["components"]["clip"]["experts"] = 2_000_000
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    probe = peak_memory_growth(
        "from mlan_kernels.integrations.checkpoint import load_adapters\nfrom mlan_kernels.integrations import "
        "unpatch\nfrom test_integration_lavin import tiny_lavin\nmodel = tiny_lavin()\n"
        "unpatch(model, 'clip')", f"load_adapters(model, {str(tmp_path)!r})", tmp_path)
    assert probe["outcome"].startswith("ValueError: ") and probe["grown_mb"] < 200, probe


@pytest.fixture
def alarm():
    """Fail instead of hanging when a FIFO is opened."""
    def hung(*_):
        raise TimeoutError("blocked on a FIFO")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_as_adapter_config_is_refused_not_opened(tmp_path, alarm):
    save_adapters(tiny_lavin(), tmp_path)
    os.remove(tmp_path / CONFIG_NAME)
    os.mkfifo(tmp_path / CONFIG_NAME)
    with pytest.raises(ValueError, match=r"adapter_config\.json: adapter config .* must be a regular file"):
        load_adapters(tiny_lavin(), tmp_path)
    os.remove(tmp_path / WEIGHTS_NAME)
    os.mkfifo(tmp_path / WEIGHTS_NAME)
    (tmp_path / CONFIG_NAME).unlink()
    save_adapters(tiny_lavin(), tmp_path / "whole")
    os.replace(tmp_path / "whole" / CONFIG_NAME, tmp_path / CONFIG_NAME)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: adapter weights .* must be a regular file"):
        load_adapters(tiny_lavin(), tmp_path)


def test_a_fifo_as_lavin_checkpoint_is_refused_by_converter_and_loader(tmp_path, capsys, alarm):
    path = tmp_path / "fifo.pth"
    os.mkfifo(path)
    assert "checkpoint file must be a regular file" in convert_error(
        capsys, ["lavin-to-hf", str(path), str(tmp_path / "out")])
    with pytest.raises(ValueError, match="must be a regular file"):
        load_lavin_adapters(tiny_lavin(), path)


def test_a_wellformed_file_still_loads(tmp_path):
    """The checks refuse nothing torch.save writes: LaVIN's own file loads and converts."""
    lavin = LavinTrainables(32, 2, 32, 8, neck_hidden=16)
    path = tmp_path / "checkpoint-19.pth"
    save_lavin_checkpoint(path, lavin)
    model = tiny_lavin()
    assert load_lavin_adapters(model, path) == ([], [])
    assert torch.equal(adapter_state_dict(model)["neck.up.bias"], lavin.adapter_proj.conv_B.bias)
    assert convert(["lavin-to-hf", str(path), str(tmp_path / "out")]) == 0


def test_a_sparse_tensor_is_refused(tmp_path, capsys):
    """A sparse 10^6 x 10^6 tensor of one value: a dense op on it would allocate 4 TB."""
    sparse = torch.sparse_coo_tensor(torch.zeros(2, 1, dtype=torch.long), torch.ones(1), (10**6, 10**6))
    path = save_with(tmp_path / "sparse.pth", **{"module.adapter_modality_embedding.weight": sparse})
    expected = "a torch.sparse_coo tensor (torch.float32); stored weights must be dense tensors"
    assert expected in convert_error(capsys, ["lavin-to-hf", str(path), str(tmp_path / "out")])
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_lavin_adapters(tiny_lavin(), path)
