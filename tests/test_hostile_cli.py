"""Hostile values through the command lines and the settings they feed: mlan-convert with
hostile args/epoch values and malformed directories (one line, exit 2, nothing written),
temperatures and scales that overflow fp32 (refused by the op, AdapterConfig, mlan-train and
mlan-convert), dropout seeds that are not one integer (the op and dropout_keep_mask), and
mlan-bench's empty --ops and unwritable output folders (refused before any measurement)."""
import argparse
import json
import os
import re

import pytest
import torch

from mlan_bench import cli as bench_cli
from mlan_kernels import mm_adapter
from mlan_kernels.integrations.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_adapters
from mlan_kernels.config import AdapterConfig
from mlan_kernels.integrations.convert import main as convert
from mlan_kernels.functional import dropout_keep_mask
from mlan_kernels.testing import make_adapter_inputs

from lavin_reference import LavinTrainables
from test_integration_lavin import tiny_lavin
from test_train_mixed import data, fails  # noqa: F401 (data is a fixture)


SEED = "seed must be an int or a one-element integer tensor, "


def convert_error(capsys, argv):
    capsys.readouterr()
    code = convert(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mlan-convert: error: ") and err.count("\n") == 1, err
    return err


def lavin_payload(**extra):
    lavin = LavinTrainables(32, 2, 32, 8, neck_hidden=16)
    return {"model": {name: p.data.clone() for name, p in lavin.named_parameters()}, **extra}


# ---------------------------------------------------------------- mlan-convert lavin-to-hf
@pytest.mark.parametrize("extra, expected", [
    (dict(args=argparse.Namespace(temperature="hot")), "args.temperature must be a finite number, got 'hot'"),
    (dict(args={"temperature": [1, 2]}), "args.temperature must be a finite number, got [1, 2]"),
    (dict(args={"adapter_scale": float("nan")}), "args.adapter_scale must be a finite number, got nan"),
    (dict(args={"temperature": 1e-300}), "temperature must be in [0.0001, 1e+06]"),
    (dict(args={"adapter_scale": 1e300}), "scale must be at most 1e+06 in magnitude"),
    (dict(epoch=torch.tensor(3)), "'epoch' must be an int in [0, 2^31), got Tensor"),
    (dict(epoch=2**40), "'epoch' must be an int in [0, 2^31), got int 1099511627776"),
    (dict(epoch="nineteen"), "'epoch' must be an int in [0, 2^31), got str 'nineteen'"),
])
def test_hostile_args_and_epoch_are_refused_and_nothing_is_written(tmp_path, capsys, extra, expected):
    path = tmp_path / "checkpoint-19.pth"
    torch.save(lavin_payload(**extra), path)
    out = tmp_path / "out"
    assert expected in convert_error(capsys, ["lavin-to-hf", str(path), str(out)])
    assert not out.exists() or os.listdir(out) == []              # no .tmp left behind


def test_a_failed_write_leaves_no_temporaries_and_the_old_files(tmp_path, capsys, monkeypatch):
    path = tmp_path / "checkpoint-19.pth"
    torch.save(lavin_payload(), path)
    out = tmp_path / "out"
    assert convert(["lavin-to-hf", str(path), str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    import mlan_kernels.integrations.convert as convert_module
    original = convert_module.os.replace

    def fail_second(source, target, calls=[]):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(source, target)
    monkeypatch.setattr(convert_module.os, "replace", fail_second)
    assert "No space left on device" in convert_error(capsys, ["lavin-to-hf", str(path), str(out), "--overwrite"])
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == sorted(before)              # no .tmp files
    assert (out / CONFIG_NAME).read_bytes() == before[CONFIG_NAME]


@pytest.mark.parametrize("flag, value", [("--temperature", "1e-300"), ("--scale", "1e300")])
def test_overflowing_temperature_or_scale_flags_are_refused(tmp_path, capsys, flag, value):
    path = tmp_path / "checkpoint-19.pth"
    torch.save(lavin_payload(), path)
    err = convert_error(capsys, ["lavin-to-hf", str(path), str(tmp_path / "out"), flag, value])
    assert ("temperature must be in [0.0001, 1e+06]" if flag == "--temperature"
            else "scale must be at most 1e+06 in magnitude") in err
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------- mlan-convert hf-to-lavin
def saved_directory(tmp_path):
    directory = tmp_path / "ours"
    save_adapters(tiny_lavin(), directory)
    return directory


def edit_config(directory, change):
    config = json.loads((directory / CONFIG_NAME).read_text())
    (directory / CONFIG_NAME).write_text(json.dumps(change(config)))


def edit_tensors(directory, change):
    from safetensors.torch import load_file, save_file
    tensors = load_file(directory / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, directory / WEIGHTS_NAME)


def _set(mapping, key, value):
    mapping[key] = value
    return mapping


HF_TO_LAVIN_DAMAGE = {
    "config_a_list": (lambda d: edit_config(d, lambda c: [c]), "expected a JSON object, got list"),
    "components_a_string": (lambda d: edit_config(d, lambda c: _set(c, "components", "llama")),
                            "key 'components' must be a non-empty object"),
    "rank_a_string": (lambda d: edit_config(d, lambda c: _set(c, "components", _set(
        c["components"], "llama", _set(c["components"]["llama"], "rank", "8")))), "rank must be a positive int"),
    "lavin_a_list": (lambda d: edit_config(d, lambda c: _set(c, "lavin", [16])),
                     "'lavin' must be an object with a positive int 'neck_hidden'"),
    "neck_hidden_a_float": (lambda d: edit_config(d, lambda c: _set(c, "lavin", {"neck_hidden": 1.5})),
                            "'lavin' must be an object with a positive int 'neck_hidden'"),
    "zero_width_up": (lambda d: edit_tensors(d, lambda t: t.update({
        "llama.layers.0.attn.up.weight": torch.zeros(2, 32, 0)})),
        "tensor 'llama.layers.0.attn.up.weight' has shape [2, 32, 0], the adapters of"),
    "nan_tensor": (lambda d: edit_tensors(d, lambda t: t["clip.layers.1.attn.down.bias"].fill_(float("nan"))),
                   "tensor 'clip.layers.1.attn.down.bias' holds non-finite values (nan or inf)"),
    "experts_3": (lambda d: edit_config(d, lambda c: _set(c, "components", _set(
        c["components"], "clip", _set(c["components"]["clip"], "experts", 3)))),
        "has 3 experts; LaVIN's adapters have 2"),
}


@pytest.mark.parametrize("case", sorted(HF_TO_LAVIN_DAMAGE))
def test_hf_to_lavin_refuses_a_malformed_directory_and_writes_nothing(tmp_path, capsys, case):
    directory = saved_directory(tmp_path)
    damage, expected = HF_TO_LAVIN_DAMAGE[case]
    damage(directory)
    target = tmp_path / "lavin.pth"
    assert expected in convert_error(capsys, ["hf-to-lavin", str(directory), str(target)])
    assert sorted(os.listdir(tmp_path)) == ["ours"]


def test_the_loader_refuses_the_same_directories(tmp_path):
    """The sibling entry point: load_adapters reads the directory with the same checks."""
    from mlan_kernels.integrations.checkpoint import load_adapters
    for case in ("zero_width_up", "nan_tensor", "rank_a_string", "config_a_list"):
        directory = saved_directory(tmp_path / case)
        damage, expected = HF_TO_LAVIN_DAMAGE[case]
        damage(directory)
        with pytest.raises(ValueError, match=re.escape(expected.split(", the adapters")[0])):
            load_adapters(tiny_lavin(), directory)


@pytest.mark.parametrize("where, expected", [("missing/lavin.pth", "does not exist"),
                                             ("afile/lavin.pth", "afile is not a directory"),
                                             ("/proc/lavin.pth", "directory /proc is not writable")])
def test_hf_to_lavin_refuses_an_output_directory_it_cannot_write(tmp_path, capsys, where, expected):
    directory = saved_directory(tmp_path)
    (tmp_path / "afile").write_text("not a directory")
    err = convert_error(capsys, ["hf-to-lavin", str(directory), str(tmp_path / where)])
    assert expected in err
    assert sorted(os.listdir(tmp_path)) == ["afile", "ours"]


def test_hf_to_lavin_still_round_trips(tmp_path, capsys):
    directory = saved_directory(tmp_path)
    assert convert(["hf-to-lavin", str(directory), str(tmp_path / "lavin.pth")]) == 0
    assert convert(["lavin-to-hf", str(tmp_path / "lavin.pth"), str(tmp_path / "back")]) == 0
    from safetensors.torch import load_file
    ours, back = load_file(directory / WEIGHTS_NAME), load_file(tmp_path / "back" / WEIGHTS_NAME)
    assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)


# ---------------------------------------------------------------- fp32 overflow settings
def adapter_inputs():
    return make_adapter_inputs(2, 3, 16, 4, 2, 1, torch.float32, "cpu")


@pytest.mark.parametrize("setting, value, expected", [
    ("temperature", 1e-300, "temperature must be in [0.0001, 1e+06] (fp32 router logits overflow outside), got 1e-300"),
    ("temperature", 1e300, "temperature must be in [0.0001, 1e+06]"),
    ("scale", 1e300, "scale must be at most 1e+06 in magnitude (fp32 outputs overflow beyond), got 1e+300"),
    ("scale", -1e7, "scale must be at most 1e+06 in magnitude"),
])
def test_overflowing_settings_are_refused_by_the_op_and_the_config(setting, value, expected):
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        mm_adapter(**adapter_inputs(), **{setting: value}, backend="reference")
    with pytest.raises(ValueError, match=f"^{setting} must be "):
        AdapterConfig(**{setting: value})


@pytest.mark.parametrize("temperature, scale", [(1e-4, 1.0), (1e6, 1.0), (10.0, 1e6), (10.0, -1e6)])
def test_the_range_ends_give_finite_results(temperature, scale):
    y = mm_adapter(**adapter_inputs(), temperature=temperature, scale=scale, backend="reference")
    assert bool(torch.isfinite(y).all())


@pytest.mark.parametrize("option, value, expected", [
    ("--temperature", "1e-300", "--temperature must be in [0.0001, 1e+06]"),
    ("--adapter-scale", "1e300", "--adapter-scale must be at most 1e+06 in magnitude"),
])
def test_mlan_train_refuses_them_before_step_0(data, tmp_path, capsys, option, value, expected):
    status, message = fails(data, tmp_path, capsys, "--steps", "2", option, value)
    assert status == 2 and expected in message


# ---------------------------------------------------------------- dropout seeds
@pytest.mark.parametrize("seed, expected", [
    (torch.tensor([1, 2]), SEED + "got a torch.int64 tensor of shape [2]"),
    (torch.tensor(1.0), SEED + "got a torch.float32 tensor of shape []"),
    (1.5, "seed must be an int or a one-element integer tensor, got 1.5"),
    (True, SEED + "got True"),
    (2**64, "seed must fit in int64, got 18446744073709551616"),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_seed_that_is_not_one_integer_is_refused(seed, expected, backend):
    with pytest.raises(TypeError, match="^" + re.escape(expected)):
        mm_adapter(**adapter_inputs(), dropout_p=0.5, seed=seed, backend=backend)


def test_dropout_keep_mask_refuses_it_too_and_accepts_one_element():
    with pytest.raises(TypeError, match="seed must be an int or a one-element integer tensor"):
        dropout_keep_mask(torch.tensor([1, 2]), 4, 8, 0.5)
    with pytest.raises(TypeError, match="got 1.5"):
        dropout_keep_mask(1.5, 4, 8, 0.5)
    assert torch.equal(dropout_keep_mask(torch.tensor([7]), 4, 8, 0.5), dropout_keep_mask(7, 4, 8, 0.5))
    inputs = adapter_inputs()
    one = mm_adapter(**inputs, dropout_p=0.5, seed=torch.tensor([7]), backend="reference")
    assert torch.equal(one, mm_adapter(**inputs, dropout_p=0.5, seed=7, backend="reference"))


# ---------------------------------------------------------------- mlan-bench
def bench_error(capsys, monkeypatch, argv):
    def measured(*args, **kwargs):
        raise AssertionError("a measurement ran before the options were checked")
    monkeypatch.setattr(bench_cli, "run_grid", measured)
    monkeypatch.setattr(bench_cli, "run_e2e", measured)
    capsys.readouterr()
    code = bench_cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mlan-bench: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("option", ["--ops", "--backends"])
@pytest.mark.parametrize("value", ["", ",", " , "])
def test_mlan_bench_refuses_an_empty_list(capsys, monkeypatch, option, value):
    err = bench_error(capsys, monkeypatch, ["--device", "cpu", option, value])
    assert f"{option}: empty; expected a comma list" in err


@pytest.mark.parametrize("option", ["--out-dir", "--plot"])
def test_mlan_bench_refuses_an_unwritable_output_folder_before_the_run(tmp_path, capsys, monkeypatch, option):
    (tmp_path / "afile").write_text("x")
    target = str(tmp_path / "afile" / "results")
    extra = ["--json", str(tmp_path / "r.json")] if option == "--plot" else []
    err = bench_error(capsys, monkeypatch, ["--device", "cpu", "--ops", "kl_div", option, target, *extra])
    assert f"{option} {target}: not a writable directory (checked before the run)" in err
