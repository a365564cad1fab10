"""mlan-convert: LaVIN -> ours -> LaVIN gives identical tensors; the converted directory loads
with load_adapters like the LaVIN file does with load_lavin_adapters; one-line user errors."""
import json
import subprocess
import sys

import pytest
import torch

from mlan_kernels.integrations.checkpoint import adapter_state_dict, load_adapters, load_lavin_adapters, save_adapters
from mlan_kernels.integrations.convert import main
from mlan_kernels.integrations.lavin import build_lavin
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama

from lavin_reference import LavinTrainables, lavin_args, save_lavin_checkpoint
from test_integration_lavin import tiny_lavin


def lavin_file(tmp_path, ddp=True, placement="attn", temperature=5.0):
    lavin = LavinTrainables(32, 2, 32, 8, neck_hidden=16, placement=placement,
                            clip_placement=placement, temperature=temperature)
    path = tmp_path / "checkpoint-19.pth"
    args = lavin_args(temperature=temperature, adapter_scale=0.5, adapter_type=placement,
                      visual_adapter_type="router_block" if placement == "block" else "router",
                      hidden_proj=16)
    saved = save_lavin_checkpoint(path, lavin, ddp=ddp, args=args)
    return path, saved


@pytest.mark.parametrize("ddp", [True, False])
@pytest.mark.parametrize("placement", ["attn", "block"])
def test_round_trip_lavin_ours_lavin_is_identical(tmp_path, ddp, placement):
    path, saved = lavin_file(tmp_path, ddp, placement)
    flags = ["--ddp-prefix"] if ddp else []
    assert main(["lavin-to-hf", str(path), str(tmp_path / "ours")]) == 0
    assert main(["hf-to-lavin", str(tmp_path / "ours"), str(tmp_path / "back.pth"), *flags]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)      # no pickled classes
    assert sorted(back["model"]) == sorted(saved)
    for name, tensor in saved.items():
        assert back["model"][name].dtype == tensor.dtype and torch.equal(back["model"][name], tensor)
    assert back["args"]["adapter_type"] == placement and back["args"]["temperature"] == 5.0
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    llama = config["components"]["llama"]
    assert (llama["rank"], llama["groups"], llama["temperature"], llama["scale"]) == (8, 2, 5.0, 0.5)
    assert llama["placement"] == placement and config["components"]["clip"]["num_layers"] == 8
    assert config["lavin"] == {"neck_hidden": 16, "clip_every": 4}


def test_converted_directory_loads_like_the_lavin_file(tmp_path):
    path, _ = lavin_file(tmp_path)
    assert main(["lavin-to-hf", str(path), str(tmp_path / "ours")]) == 0
    model = build_lavin(tiny_llama(), tiny_clip(), neck_hidden=16, temperature=5.0, scale=0.5)
    load_adapters(model, tmp_path / "ours")
    direct = build_lavin(tiny_llama(), tiny_clip(), neck_hidden=16, temperature=5.0, scale=0.5)
    load_lavin_adapters(direct, path)
    ours, theirs = adapter_state_dict(model), adapter_state_dict(direct)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_our_checkpoint_to_lavin_and_back_into_a_model(tmp_path):
    model = tiny_lavin()
    save_adapters(model, tmp_path / "ours")
    assert main(["hf-to-lavin", str(tmp_path / "ours"), str(tmp_path / "lavin.pth")]) == 0
    fresh = tiny_lavin()
    with torch.no_grad():
        for tensor in adapter_state_dict(fresh).values():
            tensor.zero_()
    assert load_lavin_adapters(fresh, tmp_path / "lavin.pth") == ([], [])
    expected, loaded = adapter_state_dict(model), adapter_state_dict(fresh)
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


def run_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err
    return exit_info.value.code, err


@pytest.mark.parametrize("argv,message", [
    (["lavin-to-hf", "/nonexistent.pth", "out"], "No such file"),
    (["frobnicate"], "invalid choice"),
    (["lavin-to-hf", "x.pth"], "required"),
    (["lavin-to-hf", "x.pth", "out", "--temperature", "0"], "--temperature must be a finite number > 0"),
    (["lavin-to-hf", "x.pth", "out", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["hf-to-lavin", "/nonexistent_dir", "x.pth"], "no adapter_model.safetensors"),
])
def test_user_errors_are_one_line_exit_2(capsys, argv, message):
    code, err = run_error(capsys, argv)
    assert code == 2 and err.startswith("mlan-convert: error: ") and message in err
    assert err.count("\n") == 1


def test_existing_output_and_bad_payloads_are_refused(tmp_path, capsys):
    path, _ = lavin_file(tmp_path)
    assert main(["lavin-to-hf", str(path), str(tmp_path / "ours")]) == 0
    code, err = run_error(capsys, ["lavin-to-hf", str(path), str(tmp_path / "ours")])
    assert code == 2 and "exists (pass --overwrite" in err
    assert main(["lavin-to-hf", str(path), str(tmp_path / "ours"), "--overwrite"]) == 0
    torch.save([1, 2], tmp_path / "list.pth")
    code, err = run_error(capsys, ["lavin-to-hf", str(tmp_path / "list.pth"), str(tmp_path / "o2")])
    assert code == 2 and "list.pth: expected a dict" in err and err.count("\n") == 1
    assert not (tmp_path / "o2").exists()


def test_help_shows_every_default():
    out = subprocess.run([sys.executable, "-m", "mlan_kernels.integrations.convert", "lavin-to-hf", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for option in ("--temperature", "--scale", "--dropout", "--trust-pickle", "--overwrite"):
        assert option in out
    assert out.count("(default:") >= 5
    out = subprocess.run([sys.executable, "-m", "mlan_kernels.integrations.convert", "hf-to-lavin", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--ddp-prefix" in out and out.count("(default:") >= 2
