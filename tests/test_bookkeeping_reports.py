"""The numbers a user reads in run.json and in a benchmark table, on inputs with a known answer:
padding share, tokens per second, parameter counts (mlan_train/report.py run_summary), and a
benchmark row's bandwidth, share of copy bandwidth and speedup over eager (mlan_bench/runner.py)
from timings chosen by hand."""
import types

import pytest
import torch

from mlan_bench import runner
from mlan_train.report import run_summary


class StubTrainer:
    """What run_summary reads of a MixedTrainer: a 3→4 Linear whose bias is frozen (16
    parameters, 12 trainable), steps of 1, 2 and 5 s, one κ probe of 0.25 s, 7 training samples
    (2 unreadable images) and 3 held-out ones."""

    def __init__(self):
        self.module = torch.nn.Linear(3, 4)
        self.module.bias.requires_grad_(False)
        self.history = {"step_seconds": [1.0, 2.0, 5.0], "kappa": [{"probe_seconds": 0.25}],
                        "lr": [], "eval": []}
        self.device, self.world_size, self.config = torch.device("cpu"), 1, None
        self.tokenizer, self.image_processor = "tokenizer", None
        self.train_set = type("Samples", (), {"image_errors": 2, "__len__": lambda self: 7,
                                              "template": types.SimpleNamespace(name="mlan")})()
        self.eval_set = [None] * 3
        self.load_reports = {}
        self.batches = types.SimpleNamespace(padding_ratio=lambda: 0.125)

    def config_dict(self):
        return {"steps": 3}


def test_run_summary_reports_hand_counted_padding_throughput_and_parameters(monkeypatch):
    import mlan_train.model
    monkeypatch.setattr(mlan_train.model, "model_record", lambda module, config: {})   # no LavinModel here
    trainer = StubTrainer()
    tokens = {"text_tokens": 300, "image_tokens": 100, "padded_tokens": 100, "samples_text": 6,
              "samples_image": 2}
    summary = run_summary(trainer, {"tokens": tokens, "loss": [1.0, 0.5, 0.25],
                                    "rank_weight_max_diff": 0.0})
    assert summary["data"]["padding_ratio"] == 100 / (100 + 300)        # padding / all text positions
    assert summary["data"]["epoch_padding_ratio"] == 0.125
    assert summary["data"]["train_samples"] == 7 and summary["data"]["eval_samples"] == 3
    assert summary["data"]["image_errors"] == 2
    assert summary["parameters"] == {"trainable": 12, "total": 16}
    throughput = summary["throughput"]
    assert throughput["train_seconds"] == 8.0 and throughput["median_step_seconds"] == 2.0
    assert throughput["tokens_per_s"] == (300 + 100) / 8.0               # padding not counted
    assert summary["probe_seconds_mean"] == 0.25
    assert summary["loss"] == [1.0, 0.5, 0.25]


def fixed_time(median_ms):
    """A phase function that `measure` (patched below) times at median_ms."""
    fn = lambda: None  # noqa: E731
    fn.median_ms = median_ms
    return fn


def test_benchmark_rows_derive_bandwidth_copy_share_and_speedup_from_the_medians(monkeypatch):
    monkeypatch.setattr(runner, "measure", lambda fn, device, warmup, iters: {"median_ms": fn.median_ms})

    def impl(name, role, **phases):
        return types.SimpleNamespace(name=name, role=role, phases=phases, outputs=None,
                                     grad_forward=None, exclude=())

    case = types.SimpleNamespace(
        op="op", label="N=1", size=1, series="s", fields={}, dtype=torch.float32,
        device=torch.device("cpu"), tolerance=0.0, copy_numel=1_000_000, element=4,
        min_bytes=lambda phase: {"fwd": 4_000_000, "fwd+bwd": 12_000_000}[phase],
        impls=[impl("eager", "reference", fwd=fixed_time(4.0), **{"fwd+bwd": fixed_time(12.0)}),
               impl("ours", "ours", fwd=fixed_time(1.0), **{"fwd+bwd": fixed_time(8.0)}),
               impl("copy", "ceiling", copy=fixed_time(0.5))])
    rows = {(row["impl"], row["phase"]): row for row in runner.run_case(case, memory=False, check=False)}
    copy = rows["copy", "copy"]
    assert copy["min_bytes"] == 8_000_000 and copy["gb_per_s"] == pytest.approx(16.0)  # 8 MB in 0.5 ms
    ours = rows["ours", "fwd"]
    assert ours["gb_per_s"] == pytest.approx(4.0)                 # 4 MB in 1 ms
    assert ours["pct_copy"] == pytest.approx(25.0) and ours["copy_gb_per_s"] == pytest.approx(16.0)
    assert ours["speedup_vs_eager"] == pytest.approx(4.0)         # 4 ms / 1 ms
    assert rows["ours", "fwd+bwd"]["speedup_vs_eager"] == pytest.approx(1.5)      # 12 / 8, same phase
    assert rows["ours", "fwd+bwd"]["gb_per_s"] == pytest.approx(1.5)              # 12 MB in 8 ms
    assert rows["eager", "fwd"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert "speedup_vs_eager" not in copy                          # no eager copy to compare with


def test_e2e_rows_derive_throughput_speedup_and_parameter_counts(monkeypatch):
    """Steps timed at 10 (fused), 20 (eager) and 5 ms (no adapters) on the "tiny" preset
    (2 LLaMA layers, D = 128, batch 2 × 64 tokens), LaVIN's adapter (r = 8, 2 experts, 2 groups)
    before each attention."""
    from mlan_bench import e2e_step
    medians = {"fused": 10.0, "eager_adapters": 20.0, "no_adapters": 5.0}
    monkeypatch.setattr(e2e_step, "measure", lambda step, device, warmup, iters: {
        "median_ms": medians[step.variant], "iqr_ms": 1.0})
    rows = {row["variant"]: row for row in e2e_step.run_e2e_step("cpu", torch.float32, "tiny", iters=1,
                                                                  warmup=0)}
    for variant, median_ms in medians.items():
        assert rows[variant]["median_s"] == median_ms / 1e3 and rows[variant]["iqr_s"] == 1e-3
        assert rows[variant]["tokens_per_s"] == pytest.approx(2 * 64 / (median_ms / 1e3))
        assert rows[variant]["speedup_vs_eager"] == pytest.approx(20.0 / median_ms)
    dim, rank, experts, groups = 128, 8, 2, 2
    adapter = (rank * dim + rank) + (experts * dim * rank // groups + experts * dim) + (experts * dim + experts)
    assert rows["fused"]["trainable_params"] == rows["eager_adapters"]["trainable_params"] == 2 * adapter


def test_run_peak_memory_on_cpu_is_in_bytes_and_sees_a_large_tensor():
    """run.json's CPU peak (the process's peak RSS) after touching a 64 MiB tensor: at least
    64 MiB, counted in bytes (getrusage reports KiB)."""
    from mlan_train.report import peak_memory
    tensor = torch.ones(16, 1024, 1024)
    assert float(tensor.sum()) == 16 * 1024 * 1024
    peak = peak_memory(torch.device("cpu"))
    assert peak["kind"] == "process peak RSS (CPU)" and peak["bytes"] >= 64 * 2**20
