"""The benchmark library's logic (mlan_bench), not its timings: traffic formulas, the
timing/memory helpers, JSON/CSV/Markdown round trips, and the CLI on a tiny grid."""
import csv
import json
import sys
import types

import pytest
import torch

from mlan_bench import cli, render, report, timing, traffic
from mlan_bench.cases import OPS, Spec, case_baselines, grid
from mlan_kernels.testing import measure, summarize_times

OLD_RESULTS = "benchmarks/results/h100-bf16-single-2026-11-23.json"


def test_traffic_formulas():
    tokens, dim, rank, bf16 = 16384, 4096, 8, 2
    hidden = tokens * rank * 4                              # H [N, r] in fp32
    assert traffic.mm_adapter_bytes("fwd", tokens, dim, rank, bf16) == 2 * tokens * dim * bf16 + hidden
    assert traffic.mm_adapter_bytes("bwd", tokens, dim, rank, bf16) == 3 * tokens * dim * bf16 + hidden
    assert traffic.mm_adapter_bytes("fwd+bwd", tokens, dim, rank, bf16) == 5 * tokens * dim * bf16 + 2 * hidden
    assert traffic.kl_div_bytes("fwd", 8192, 32000, bf16) == 2 * 8192 * 32000 * bf16
    assert traffic.kl_div_bytes("fwd+bwd", 8, 10, 4) == 6 * 8 * 10 * 4
    once = 2 * 8 * 16 + 100 * 16
    assert [traffic.fused_linear_kl_bytes(p, 8, 16, 100, 4) for p in ("fwd", "bwd", "fwd+bwd")] == \
        [once * 4, 2 * once * 4, 3 * once * 4]
    assert traffic.scale_grads_bytes(1000, 4) == 12000
    assert traffic.copy_bytes(1000, 2) == 4000


def test_summarize_and_measure():
    stats = summarize_times([1.0, 2.0, 3.0, 4.0, 100.0])
    assert stats["median_ms"] == 3.0 and stats["iters"] == 5
    assert stats["q1_ms"] <= stats["median_ms"] <= stats["q3_ms"]
    assert stats["iqr_ms"] == pytest.approx(stats["q3_ms"] - stats["q1_ms"])
    calls = []
    result = measure(lambda: calls.append(1), "cpu", warmup=2, iters=3)
    assert len(calls) == 5 and result["iters"] == 3 and result["median_ms"] >= 0


def test_saved_tensor_bytes_counts_activations_not_inputs():
    x = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(32, 32, requires_grad=True)
    # x @ w saves x and w (excluded); exp saves its [64, 32] fp32 output: 8 KiB
    assert timing.saved_tensor_bytes(lambda: (x @ weight).exp(), [x, weight]) == 64 * 32 * 4
    assert timing.saved_tensor_bytes(lambda: x * 2.0, [x]) == 0


def test_peak_memory_cpu_sees_a_large_temporary():
    peak = timing.peak_memory(lambda: torch.ones(16, 1024, 1024).sum(), "cpu")   # 64 MiB
    if peak is not None:                                    # None where /proc is not writable
        assert peak >= 48 * 2**20


def test_grid_phases_and_presets():
    specs = grid(["mm_adapter_fwd", "mm_adapter_fwdbwd", "scale_grads"], "cpu", "paper")
    adapter = [spec for spec in specs if spec.op == "mm_adapter"]
    assert {spec.params["dim"] for spec in adapter} == {128, 512, 1024, 4096}
    assert {spec.params["tokens"] for spec in adapter} == {512, 2048}
    assert all(spec.phases == ("fwd", "fwd+bwd") for spec in adapter)
    gpu = grid(["mm_adapter_fwd"], "cuda", "paper")
    assert {spec.params["dim"] for spec in gpu} == {1024, 4096, 5120}
    assert {(spec.params["groups"], spec.params["routing"]) for spec in gpu} >= {(1, "mixed"), (2, "single")}
    assert len(grid(list(OPS), "cuda", "all")) > len(grid(list(OPS), "cuda", "paper"))
    with pytest.raises(ValueError, match="unknown op"):
        grid(["nope"], "cpu", "small")


def _rows():
    common = dict(dtype="float32", size=512, series="D=1024", tokens=512, dim=1024)
    return [dict(op="mm_adapter", phase="copy", impl="copy", role="ceiling", shape="N=512 D=1024",
                 median_ms=0.5, iqr_ms=0.1, gb_per_s=8.0, pct_copy=100.0, **common),
            dict(op="mm_adapter", phase="fwd", impl="cpu", role="ours", shape="N=512 D=1024",
                 median_ms=1.25, iqr_ms=0.2, gb_per_s=3.4, pct_copy=42.0, speedup_vs_eager=3.5,
                 peak_memory_bytes=2**21, saved_bytes=None, max_rel_err=1e-7, ok=True, **common),
            dict(op="mm_adapter", phase="fwd", impl="eager", role="reference", shape="N=512 D=1024",
                 error="RuntimeError: boom", **common)]


def test_json_csv_and_markdown_round_trip(tmp_path):
    env = report.environment("cpu", torch.float32)
    assert report.default_path("out", env).endswith(f"cpu-{env['threads']}core-fp32-{env['date']}.json")
    path = tmp_path / "results.json"
    report.write_json(str(path), env, _rows(), command="mlan-bench --device cpu")
    assert report.load_json(str(path))["rows"] == _rows()
    report.write_csv(str(tmp_path / "results.csv"), _rows())
    with open(tmp_path / "results.csv") as handle:
        lines = list(csv.DictReader(handle))
    assert [line["impl"] for line in lines] == ["copy", "cpu", "eager"] and lines[1]["median_ms"] == "1.25"
    markdown = render.render(str(path))
    assert markdown.splitlines()[0].startswith(env["device"]) and env["date"] in markdown
    assert "| mm_adapter | fwd | N=512 D=1024 | cpu | 1.250 | 0.200 | 3.4 | 42.0 | 3.50 | 2.0 |  | ok |" in markdown
    assert "error: RuntimeError: boom" in markdown
    assert "error: RuntimeError: boom" in report.format_table(_rows())


def test_render_reads_the_old_format():
    markdown = render.render(OLD_RESULTS, phases=["fwd+bwd"])
    assert "NVIDIA H100" in markdown.splitlines()[0]
    assert "| mm_adapter | fwd+bwd | N=16384 D=4096 g=2 single | triton | 2.413 | 0.177 |" in markdown


def test_cli_tiny_grid_writes_json_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    status = cli.main(["--device", "cpu", "--shapes", "small", "--ops", "mm_adapter_fwdbwd,kl_div",
                       "--iters", "2", "--warmup", "0", "--json", str(out), "--plot", str(tmp_path / "png"),
                       "--no-compile"])
    assert status == 0
    data = json.loads(out.read_text())
    assert data["environment"]["device_type"] == "cpu" and data["environment"]["threads"] >= 1
    impls = {(row["op"], row["impl"]) for row in data["rows"]}
    assert {("mm_adapter", "cpu"), ("mm_adapter", "eager"), ("mm_adapter", "lora"), ("mm_adapter", "copy"),
            ("kl_div", "chunked"), ("kl_div", "unfused")} <= impls
    assert ("mm_adapter", "compile") not in impls                     # --no-compile
    ours = next(row for row in data["rows"] if row["impl"] == "cpu")
    assert ours["phase"] == "fwd+bwd" and ours["ok"] is True and ours["saved_bytes"] > 0
    assert ours["pct_copy"] > 0 and ours["speedup_vs_eager"] > 0
    assert (tmp_path / "cpu.csv").exists()
    assert {path.name for path in (tmp_path / "png").iterdir()} == {
        "cpu-mm_adapter.png", "cpu-kl_div.png", "cpu-speedup.png"}
    captured = capsys.readouterr()
    assert "mm_adapter" in captured.out
    warned = [line for line in captured.err.splitlines() if line.startswith("mlan-bench: WARNING")]
    cases = {(row["op"], row["shape"]) for row in data["rows"]}
    assert len(warned) == len(cases) and all("2 iters < 10" in line for line in warned)   # --iters 2
    assert all(row["warning"].startswith("2 iters < 10") for row in data["rows"])


def test_compile_baseline_defaults():
    """Without --compile: torch.compile runs for every family on cuda, only the MM-Adapter on CPU."""
    every = ["eager", "compile", "copy"]
    assert case_baselines(every, "cpu", "mm_adapter", None) == every
    assert case_baselines(every, "cpu", "kl_div", None) == ["eager", "copy"]
    assert case_baselines(every, "cuda", "kl_div", None) == every
    assert case_baselines(every, "cpu", "kl_div", True) == every
    assert case_baselines(every, "cuda", "mm_adapter", False) == ["eager", "copy"]


def test_cli_e2e_step_rows(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("mlan_bench.e2e_step")
    fake.run_e2e_step = lambda device, dtype, preset="small", iters=10, warmup=2: [
        dict(op="e2e_step", variant=variant, layers=2, dim=64, tokens=128, median_s=seconds,
             iqr_s=0.001, tokens_per_s=128 / seconds, peak_memory_bytes=None, speedup_vs_eager=0.02 / seconds)
        for variant, seconds in (("fused", 0.01), ("eager_adapters", 0.02), ("no_adapters", 0.005))]
    monkeypatch.setitem(sys.modules, "mlan_bench.e2e_step", fake)
    out = tmp_path / "e2e.json"
    assert cli.main(["--device", "cpu", "--ops", "e2e_step", "--json", str(out), "--no-plot"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["impl"], row["role"]) for row in rows] == [
        ("fused", "ours"), ("eager_adapters", "reference"), ("no_adapters", "baseline")]
    assert rows[0]["median_ms"] == pytest.approx(10.0) and rows[0]["speedup_vs_eager"] == pytest.approx(2.0)
    monkeypatch.setitem(sys.modules, "mlan_bench.e2e_step", None)      # as if absent
    assert cli.main(["--device", "cpu", "--ops", "e2e_step", "--json", str(out), "--no-plot"]) == 0
    assert "e2e_step skipped" in capsys.readouterr().err


def test_spec_params_round_trip():
    spec = Spec("kl_div", tuple(sorted(dict(tokens=8, vocab=32).items())), ("fwd",))
    assert spec.params == {"tokens": 8, "vocab": 32}


def test_tensor_memory_counts_live_storages_once():
    """TensorMemory: a 3-D @ 2-D matmul (view, mm, _unsafe_view) counts its result once; freed
    tensors leave live_bytes; tensors saved for backward stay counted until released."""
    from mlan_bench.tensor_memory import TensorMemory
    a, w = torch.randn(2, 3, 4), torch.randn(4, 5, requires_grad=True)
    with TensorMemory() as memory:
        out = a @ w
        assert memory.live_bytes == 2 * 3 * 5 * 4
        hidden = out.sin()                      # sin saves `out` for backward
        del out
        assert memory.live_bytes == 2 * (2 * 3 * 5 * 4)
        hidden.sum().backward()
        del hidden
    assert memory.live_bytes == w.grad.numel() * 4          # only the gradient is left
    assert memory.peak_bytes >= 3 * (2 * 3 * 5 * 4) and memory.largest_bytes == 120


@pytest.mark.parametrize("options, expected", [
    (["--ops", "nope"], "--ops: unknown ['nope']; expected a comma list of"),
    (["--backends", "tpu"], "--backends: unknown ['tpu']"),
    (["--baselines", "eagr"], "--baselines: unknown ['eagr']"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--iters", "many"], "argument --iters: invalid int value: 'many'"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["--json", "{dir}"], "--json {dir}: is a directory"),
    (["--csv", "{file}/x.csv"], "--csv {file}/x.csv: cannot be created"),
    (["--out-dir", "{file}"], "--out-dir {file}: exists and is not a directory"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: torch.cuda")]))
def test_cli_usage_errors_are_one_line_exit_2(tmp_path, capsys, options, expected):
    from mlan_bench.cli import main
    (tmp_path / "file").write_text("x")
    paths = {"dir": str(tmp_path), "file": str(tmp_path / "file")}
    status = main(["--device", "cpu", *[option.format(**paths) for option in options]]
                  if options[0] != "--device" else options)
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("mlan-bench: error: ") and expected.format(**paths) in lines[0]


@pytest.mark.parametrize("iters, median, iqr, expected", [
    (20, 1.0, 0.25, ""),                                          # at the threshold: trusted
    (10, 1.0, 0.26, "IQR 26% of median > 25%"),
    (9, 1.0, 0.1, "9 iters < 10"),
    (3, 1.8, 5.8 - 1.8, "3 iters < 10, IQR 222% of median > 25%"),
    (None, 2.0, 0.1, ""),                                         # rows without a count: spread only
])
def test_trust_warning_names_too_few_iterations_and_a_wide_spread(iters, median, iqr, expected):
    row = dict(median_ms=median, iqr_ms=iqr) | ({} if iters is None else {"iters": iters})
    assert report.trust_warning(row) == expected


def test_case_warnings_are_one_line_per_case():
    rows = [dict(op="kl_div", shape="N=8 V=32", impl=impl, phase=phase, median_ms=1.0, iqr_ms=iqr, iters=20)
            for impl, phase, iqr in (("chunked", "fwd", 0.5), ("chunked", "bwd", 0.9), ("unfused", "fwd", 0.1))]
    rows.append(dict(op="kl_div", shape="N=16 V=32", impl="chunked", phase="fwd", median_ms=1.0, iqr_ms=0.1,
                     iters=20))
    rows.append(dict(op="kl_div", shape="N=32 V=32", impl="chunked", phase="fwd", error="RuntimeError: x"))
    assert report.case_warnings(rows) == [
        "WARNING kl_div N=8 V=32: timings not to be trusted: chunked fwd (IQR 50% of median > 25%); "
        "chunked bwd (IQR 90% of median > 25%)"]


def test_the_text_table_never_cuts_a_name():
    long_impl, long_shape = "triton_split_k_with_a_very_long_name", "N=16384 D=4096 g=2 single, routed per sample"
    rows = _rows()[:2] + [dict(_rows()[1], impl=long_impl, shape=long_shape, iqr_ms=1.0, iters=3)]
    lines = report.format_table(rows).splitlines()
    assert long_impl in lines[4] and long_shape in lines[4]
    assert lines[4].endswith("ok     WARNING 3 iters < 10, IQR 80% of median > 25%")
    assert "WARNING" not in lines[3]                               # iters absent, IQR 16%
    median_end = len(lines[0].split("median ms")[0]) + len("median ms")
    assert all(line[median_end - 5:median_end] == "1.250" for line in lines[3:])   # columns aligned
