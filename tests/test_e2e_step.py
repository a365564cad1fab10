"""run_e2e_step on the "tiny" preset: row contract of the end-to-end train-step benchmark."""
import math

import pytest
import torch

from mlan_bench.e2e_step import VARIANTS, run_e2e_step

KEYS = {"op", "variant", "device", "dtype", "layers", "dim", "tokens", "batch", "seq_len",
        "median_s", "iqr_s", "tokens_per_s", "peak_memory_bytes", "speedup_vs_eager"}


def test_run_e2e_step_rows():
    rows = run_e2e_step("cpu", torch.float32, preset="tiny", iters=2, warmup=1)
    assert [row["variant"] for row in rows] == list(VARIANTS)
    for row in rows:
        assert KEYS <= row.keys()
        assert row["op"] == "e2e_step" and row["device"] == "cpu" and row["dtype"] == "float32"
        assert (row["layers"], row["dim"], row["batch"], row["seq_len"]) == (2, 128, 2, 64)
        assert row["tokens"] == 2 * 64
        for key in ("median_s", "tokens_per_s", "speedup_vs_eager"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert math.isfinite(row["iqr_s"]) and row["iqr_s"] >= 0
        assert row["peak_memory_bytes"] is None            # CPU: no allocator peak
        assert row["saved_bytes"] > 0
    by_variant = {row["variant"]: row for row in rows}
    assert by_variant["eager_adapters"]["speedup_vs_eager"] == 1.0
    assert by_variant["no_adapters"]["trainable_params"] == (2 * 2 + 1) * 128   # RMSNorm weights only
    assert by_variant["fused"]["trainable_params"] == by_variant["eager_adapters"]["trainable_params"]


def test_run_e2e_step_rejects_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        run_e2e_step("cpu", torch.float32, preset="huge")
