"""pytest-benchmark suites over the cases of mlan_bench (the grid `mlan-bench` runs).

A test marked @pytest.mark.bench_op("<op family>") takes the `bench_item` argument: one
(case, implementation, phase) of the "small" preset, CUDA shapes and bf16 when a GPU is
there, else CPU shapes in fp32 (triton is skipped on CPU: TRITON_INTERPRET is not set here).
The torch.compile baseline runs on CUDA only (on 2 CPU cores it compiles for ~7 s per graph);
MLAN_BENCH_COMPILE=1 adds it on CPU too.

    pytest benchmarks --benchmark-only        (timings)
    pytest benchmarks --benchmark-disable     (smoke: each callable once, plus the checks)
"""
import os

import pytest
import torch

from mlan_bench.cases import BASELINES, OPS, build_case, grid
from mlan_bench.runner import check_impl

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
COMPILE = DEVICE.type == "cuda" or os.environ.get("MLAN_BENCH_COMPILE") == "1"
_cases, _checks = {}, {}


def cases_of(family):
    """The small-preset cases of one op family, built once per session."""
    if family not in _cases:
        ops = [name for name, (op_family, _) in OPS.items() if op_family == family]
        baselines = [name for name in BASELINES if name != "compile" or COMPILE]
        _cases[family] = [build_case(spec, DEVICE, DTYPE, baselines=baselines)
                          for spec in grid(ops, DEVICE.type, "small")]
    return _cases[family]


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_op(family): parametrize bench_item over that op's cases")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("bench_op")
    if "bench_item" not in metafunc.fixturenames or marker is None:
        return
    items, ids = [], []
    for case in cases_of(marker.args[0]):
        for impl in case.impls:
            for phase in impl.phases:
                items.append((case, impl, phase))
                ids.append("-".join((case.label, impl.name, phase)).replace(" ", "_").replace(",", ""))
    metafunc.parametrize("bench_item", items, ids=ids)


def assert_matches_reference(case, impl):
    """Once per (case, implementation): its output agrees with the reference's."""
    key = (id(case), impl.name)
    if key not in _checks:
        reference = next(item for item in case.impls if item.role == "reference")
        _checks[key] = check_impl(case, impl, reference.outputs() if impl.outputs else None)
    error, ok = _checks[key]
    assert ok is not False, (f"{case.op} {case.label} {impl.name}: max relative error {error:.3e} "
                             f"> {case.tolerance:.0e} against the reference")


@pytest.fixture
def run_bench(benchmark):
    """run_bench(bench_item): check the output, then time the phase (synchronized on CUDA)."""
    def run(item):
        case, impl, phase = item
        assert_matches_reference(case, impl)
        benchmark.group = f"{case.op} {phase} {case.label}"
        benchmark.extra_info.update(op=case.op, impl=impl.name, role=impl.role, phase=phase,
                                    dtype=str(case.dtype), **case.fields)
        fn = impl.phases[phase]
        if case.device.type == "cuda":
            return benchmark(lambda: (fn(), torch.cuda.synchronize(case.device)))
        return benchmark(fn)
    return run
