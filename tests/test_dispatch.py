"""The one backend registry (mlan_kernels.dispatch): entries, env overrides, errors, warn-once."""
import dataclasses
import warnings

import pytest
import torch

from helpers import HAS_KL_CPU
from mlan_kernels import dispatch

CPU = torch.device("cpu")


def test_every_op_lists_its_backends_and_their_modules_import():
    assert dispatch.names("mm_adapter") == dispatch.BACKENDS == ("reference", "triton", "cuda", "cpu")
    assert dispatch.names("kl_div") == ("triton", "cpu", "chunked")
    assert dispatch.names("grad_scale") == ("foreach", "triton")
    for op in dispatch.OPS:                    # the fallback runs everything, on every device
        fallback = dispatch.OPS[op].fallback
        assert dispatch.unavailable_reason(fallback, CPU, torch.float64, op=op) is None
        assert dispatch.get_backend(fallback, op=op) is not None


def test_entries_are_frozen_and_validated_at_creation():
    entry = dispatch.Backend("kl_div", "extra", "mlan_kernels.backends.kl_chunked")
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.name = "other"
    bad = [(dict(op="softmax"), "op must be one of"), (dict(name="auto"), "name must be"),
           (dict(module="somewhere.else"), "module must be"), (dict(devices=("tpu",)), "devices must be"),
           (dict(dtypes=("float32",)), "dtypes must be")]
    for change, message in bad:
        fields = {**dict(op="kl_div", name="extra", module="mlan_kernels.backends.kl_chunked"), **change}
        with pytest.raises(ValueError, match=message):
            dispatch.Backend(**fields)
    with pytest.raises(ValueError, match="already registered"):
        dispatch.register(dispatch.Backend("kl_div", "chunked", "mlan_kernels.backends.kl_chunked"))


@pytest.mark.parametrize("op, env", [("mm_adapter", "MLAN_BACKEND"), ("kl_div", "MLAN_KL_BACKEND"),
                                     ("grad_scale", "MLAN_GRAD_SCALE_BACKEND")])
def test_unknown_names_raise_one_line_listing_the_registered_ones(monkeypatch, op, env):
    monkeypatch.setenv(env, "no-such-backend")
    with pytest.raises(ValueError) as error:
        dispatch.select_backend(CPU, torch.float32, op=op)
    message = str(error.value)
    assert "\n" not in message and env in message and "'no-such-backend'" in message
    assert all(repr(name) in message for name in ("auto",) + dispatch.names(op))
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.select_backend(CPU, torch.float32, "fast", op=op)


def test_each_env_override_applies_to_its_own_op_only(monkeypatch):
    for env in ("MLAN_BACKEND", "MLAN_KL_BACKEND", "MLAN_GRAD_SCALE_BACKEND"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("MLAN_KL_BACKEND", "chunked")
    assert dispatch.select_backend(CPU, torch.float32, op="kl_div") == "chunked"
    assert dispatch.select_backend(CPU, torch.float32, "cpu", op="kl_div") == ("cpu" if HAS_KL_CPU else "chunked")
    monkeypatch.setenv("MLAN_BACKEND", "reference")
    assert dispatch.select_backend(CPU, torch.float32) == "reference"
    monkeypatch.setenv("MLAN_GRAD_SCALE_BACKEND", "foreach")
    assert dispatch.select_backend(CPU, torch.float32, op="grad_scale") == "foreach"


def test_kl_env_override_reaches_the_op(monkeypatch):
    from mlan_kernels import kl_div_logits
    calls = []
    chunked = dispatch.get_backend("chunked", op="kl_div")
    original = chunked.forward
    monkeypatch.setattr(chunked, "forward", lambda *args: calls.append(1) or original(*args))
    monkeypatch.setenv("MLAN_KL_BACKEND", "chunked")
    kl_div_logits(torch.randn(3, 7), torch.randn(3, 7))
    assert calls


def test_an_unavailable_backend_warns_once_for_any_op(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert dispatch.select_backend(CPU, torch.float32, "triton", op="grad_scale") == "foreach"
            assert dispatch.select_backend(CPU, torch.float32, "cuda") == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2, messages
    assert "grad scaling backend 'triton' unavailable" in messages[0] and "'foreach'" in messages[0]
    assert "MM-Adapter backend 'cuda' unavailable" in messages[1]
    dispatch.reset_warnings()
    with pytest.warns(RuntimeWarning, match="'cuda' unavailable"):
        dispatch.select_backend(CPU, torch.float32, "cuda")


def test_float64_under_auto_falls_back_silently(recwarn, monkeypatch):
    for env in ("MLAN_BACKEND", "MLAN_KL_BACKEND"):
        monkeypatch.delenv(env, raising=False)
    assert dispatch.select_backend(CPU, torch.float64) == "reference"
    assert dispatch.select_backend(CPU, torch.float64, op="kl_div") == "chunked"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_grad_scale_env_override_reaches_the_op(monkeypatch):
    from mlan_kernels import scale_grads_
    calls = []
    foreach = dispatch.get_backend("foreach", op="grad_scale")
    original = foreach.scale_grads
    monkeypatch.setattr(foreach, "scale_grads", lambda *args: calls.append(1) or original(*args))
    monkeypatch.setenv("MLAN_GRAD_SCALE_BACKEND", "foreach")
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 2.0)
    norms = scale_grads_([[param]], [0.5])
    assert calls and torch.allclose(param.grad, torch.ones(3)) and torch.allclose(norms, torch.tensor([12.0]).sqrt())
