"""Per-group grad scaling over LaVIN-7B's 56 adapters: foreach (and triton on CUDA) vs the loop."""
import pytest


@pytest.mark.bench_op("scale_grads")
def test_scale_grads(bench_item, run_bench):
    run_bench(bench_item)
