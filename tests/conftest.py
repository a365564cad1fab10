"""Shared test setup. pytest imports this before any test module, so the Triton interpreter
switch below is in place before anything imports triton (triton reads it when kernels are
defined): without a GPU, the `triton` backend runs its kernels on CPU tensors, slowly."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def reset_backend_warnings():
    """Forget which 'backend unavailable' warnings were already issued, so each test sees its own."""
    from mlan_kernels.utils import reset_warnings
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture(autouse=True)
def seed_torch():
    """Every test starts from torch.manual_seed(0) (CPU and CUDA generators)."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def checked_triton_launches(monkeypatch):
    """Under the interpreter, every launch of the three Triton backends is checked for the
    rules a GPU enforces and for reads and writes outside its tensors (bounds checking):
    tests/triton_launches.py."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from mlan_kernels.backends import grad_scale_triton, kl_triton, triton as mm_adapter_triton
    except ImportError:                                     # no triton: nothing launches
        return
    from triton_launches import address_table_extents, check_launches, install_address_checks
    install_address_checks(monkeypatch)
    check_launches(monkeypatch, mm_adapter_triton)
    check_launches(monkeypatch, kl_triton)
    check_launches(monkeypatch, grad_scale_triton, indirect=address_table_extents)
