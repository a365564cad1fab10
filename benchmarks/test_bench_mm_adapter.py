"""MM-Adapter fwd / bwd / fwd+bwd: our backends vs eager, compile (CUDA), LoRA-r8 and copy."""
import pytest


@pytest.mark.bench_op("mm_adapter")
def test_mm_adapter(bench_item, run_bench):
    run_bench(bench_item)
