"""Fused KL over logits and fused linear + KL: ours vs eager, compile (CUDA), unfused, copy."""
import pytest


@pytest.mark.bench_op("kl_div")
def test_kl_div(bench_item, run_bench):
    run_bench(bench_item)


@pytest.mark.bench_op("fused_linear_kl")
def test_fused_linear_kl(bench_item, run_bench):
    run_bench(bench_item)
