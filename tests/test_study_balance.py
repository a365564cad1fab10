"""python/study_balance.py (mlan_train/study.py): a 1-seed smoke run of the κ-scheduling study
on a tiny stage-1 base, tiny models and a few steps (the full study: docs/commit_balance.md §9);
its JSON renders as the README's study table (mlan_bench.render)."""
import json
import os

from mlan_bench.render import BLOCK, render_blocks
from mlan_kernels.training.study_table import render_study
from mlan_kernels.data.synthetic import make_synthetic
from mlan_train.study import main

TINY = ["--dim", "32", "--layers", "1", "--heads", "2", "--clip-dim", "32", "--batch-size", "4",
        "--eval-samples", "4", "--steps", "8", "--warmup-steps", "1", "--probe-every", "1",
        "--base-steps", "2"]


def test_one_seed_smoke_study_writes_json_png_and_a_rendered_table(tmp_path, capsys):
    make_synthetic(tmp_path / "data", train_size=96, eval_size=16, seed=4)
    result = tmp_path / "study.json"
    assert main(["--seeds", "0", "--shares", "0.5", "--aux-weights", "0", "5", "--out",
                 str(tmp_path / "runs"), "--json", str(result), "--data", str(tmp_path / "data"),
                 "--base", str(tmp_path / "base"), *TINY]) == 0
    data = json.loads(result.read_text())
    assert data["kind"] == "balance-study" and len(data["runs"]) == 4 and len(data["groups"]) == 4
    assert {(g["alpha"], g["aux_weight"]) for g in data["groups"]} == {(0, 0), (0, 5), (0.5, 0), (0.5, 5)}
    for run in data["runs"]:
        assert run["probes"] >= 2 and run["image_tokens"] > 0 and run["probe_overhead"] > 0
        assert run["aux_steps"] == 0 if run["aux_weight"] == 0 else run["aux_steps"] > 0
    assert all(g["image_accuracy"][1] == 0.0 for g in data["groups"])        # one seed: std 0
    assert os.path.getsize(tmp_path / "study.png") > 0
    assert (tmp_path / "base" / "base.json").is_file()                      # made once, reused
    table = capsys.readouterr().out
    assert "| share | α | λ | image % |" in table and "| 0.5 | 0.5 | 5 |" in table
    rows = [line for line in render_study(data).splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in rows}) == 1          # every row has every column
    assert main(["--from-json", str(result), "--png", str(tmp_path / "again.png")]) == 0
    assert os.path.getsize(tmp_path / "again.png") > 0
    assert render_study(data) in capsys.readouterr().out and render_study(data) in table
    readme = f"<!-- results: {result.name} -->\nstale\n<!-- /results -->\n"
    rendered = render_blocks(readme, str(tmp_path))
    assert len(BLOCK.findall(rendered)) == 1 and "| 0.5 | 0 | 5 |" in rendered and "stale" not in rendered
