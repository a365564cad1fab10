"""`make demo` (python/study_balance.py --kind demo): a short demo configuration, stage 1 and
stage 2 with two seeds in parallel processes, made twice from scratch gives bit-identical bases
and losses (so the README's demo numbers are what a fresh clone on the same CPU prints); the
demo's tables are rendered from its JSON; a finished run is reused only with the same arguments."""
import hashlib
import json
import math

import pytest

from mlan_kernels.training.study_table import render_demo
from mlan_kernels.data.synthetic import make_synthetic
from mlan_train.study import loss_digest, main

TINY = ["--dim", "32", "--layers", "1", "--heads", "2", "--clip-dim", "32", "--batch-size", "4",
        "--eval-samples", "8", "--steps", "12", "--warmup-steps", "2", "--probe-every", "3",
        "--log-every", "1", "--base-steps", "3"]
DEMO = ["--kind", "demo", "--alphas", "0", "--aux-weights", "0", "--shares", "0.5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    make_synthetic(directory, train_size=96, eval_size=16, seed=4)
    return str(directory)


def demo(data, root, *extra):
    """One demo from scratch under `root` (its own base); returns (JSON, {seed: run.json})."""
    result = root / "demo.json"
    assert main([*DEMO, "--data", data, "--base", str(root / "base"), "--out", str(root / "runs"),
                 "--json", str(result), *TINY, *extra]) == 0
    runs = {path.parent.name: json.loads(path.read_text()) for path in (root / "runs").glob("*/run.json")}
    return json.loads(result.read_text()), runs


def test_two_demos_from_scratch_give_bit_identical_bases_and_losses(data, tmp_path, capsys):
    first, first_runs = demo(data, tmp_path / "a", "--seeds", "0", "1", "--jobs", "2")
    second, second_runs = demo(data, tmp_path / "b", "--seeds", "0", "1", "--jobs", "2")
    for part in ("llama", "clip"):
        weights = [(root / "base" / part / "model.safetensors").read_bytes() for root in
                   (tmp_path / "a", tmp_path / "b")]
        assert weights[0] == weights[1], f"stage 1's {part} differs between two identical demos"
    assert sorted(first_runs) == sorted(second_runs) == ["share0.5-alpha0-aux0-seed0",
                                                         "share0.5-alpha0-aux0-seed1"]
    for name, run in first_runs.items():
        assert len(run["loss"]) == 12
        assert run["loss"] == second_runs[name]["loss"], f"{name}: losses differ"
        assert run["final_eval"] == second_runs[name]["final_eval"]
    seeds = list(first_runs.values())
    assert seeds[0]["loss"] != seeds[1]["loss"]                 # the seed does change the run
    assert [r["loss_digest"] for r in first["runs"]] == [r["loss_digest"] for r in second["runs"]]
    assert first["kind"] == "demo" and first["stage1"]["cpu_seconds"] > 0 and not first["stage1"]["reused"]
    assert all(r["cpu_seconds"] > 0 for r in first["runs"])    # measured per process
    printed = capsys.readouterr().out
    assert "| share | seeds | image % | colour % |" in printed and "| 0.5 | 1 |" in printed


def test_loss_digest_sees_one_ulp():
    losses = [2.5, 1.25, 0.75]
    assert loss_digest(losses) == loss_digest(list(losses))
    assert loss_digest(losses) != loss_digest([2.5, 1.25, math.nextafter(0.75, 1.0)])
    one_then_half = bytes.fromhex("000000000000f03f" "000000000000e03f")   # 1.0, 0.5 as <f8
    assert loss_digest([1.0, 0.5]) == hashlib.sha256(one_then_half).hexdigest()


def test_a_finished_run_is_reused_only_with_the_same_arguments(data, tmp_path, capsys):
    demo(data, tmp_path, "--seeds", "0", "--jobs", "1")
    capsys.readouterr()
    again, _ = demo(data, tmp_path, "--seeds", "0", "--jobs", "1")
    assert "reusing share0.5-alpha0-aux0-seed0" in capsys.readouterr().out
    longer, runs = demo(data, tmp_path, "--seeds", "0", "--jobs", "1", "--steps", "14")
    assert "reusing share" not in capsys.readouterr().out
    assert len(runs["share0.5-alpha0-aux0-seed0"]["loss"]) == 14 and longer["runs"][0]["steps"] == 14


def test_the_demo_table_is_mean_and_sample_std_over_seeds():
    def run(seed, image, colour):
        return {"share": 0.875, "seed": seed, "image_accuracy": image, "text_accuracy": 1.0,
                "by_task": {"colour": colour, "add": 1.0}, "image_samples": 5700 + seed,
                "final_loss": 0.5, "loss_digest": "0123456789abcdef"}
    data = {"runs": [run(0, 1.0, 1.0), run(1, 0.5, 0.0)],
            "groups": [{"share": 0.875, "seeds": [0, 1], "image_accuracy": [0.75, 0.3535533905932738],
                        "text_accuracy": [1.0, 0.0],
                        "by_task": {"colour": [0.5, 0.7071067811865476], "add": [1.0, 0.0]}}]}
    lines = render_demo(data).splitlines()
    assert lines[0] == "| share | seeds | image % | colour % | add % | text % | image samples |"
    assert lines[2] == "| 0.875 | 2 | 75.0 ± 35.4 | 50 ± 71 | 100 ± 0 | 100.0 ± 0.0 | 5,700–5,701 |"
    assert lines[6] == "| 0.875 | 0 | 100.0 | 100 | 100 | 100.0 | 0.5000 | `0123456789ab` |"
    assert lines[7] == "| 0.875 | 1 | 50.0 | 0 | 100 | 100.0 | 0.5000 | `0123456789ab` |"
