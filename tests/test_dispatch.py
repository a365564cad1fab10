"""The one backend registry (mlan_kernels.dispatch): entries, env overrides, errors, warn-once."""
import dataclasses
import re
import warnings

import pytest
import torch

from helpers import HAS_KL_CPU, HAS_TRITON
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


def test_op_policies_are_validated_at_creation():
    message = ("preferred must be ((device type, (backend, ...)), ...) with a device type in "
               "('cpu', 'cuda'), got {!r}")
    for preferred in ((("tpu", ("a",)),), (("cuda", "triton"),), (("xla", "triton"),)):
        with pytest.raises(ValueError, match="^" + re.escape(message.format(preferred)) + "$"):
            dispatch.Op("x", "X", "MLAN_X", "a", preferred)
    assert dispatch.Op("x", "X", "MLAN_X", "a", (("cpu", ("a",)), ("cuda", ()))).preferred[1] == ("cuda", ())
    assert dispatch.Backend("kl_div", "extra", "mlan_kernels.backends.kl_chunked", ("cpu", "cuda")).devices == ("cpu", "cuda")


def test_a_registered_backend_can_be_selected_and_loaded(monkeypatch):
    monkeypatch.setattr(dispatch, "_BACKENDS", dict(dispatch._BACKENDS))
    entry = dispatch.register(dispatch.Backend("kl_div", "extra", "mlan_kernels.backends.kl_chunked"))
    assert dispatch.names("kl_div")[-1] == "extra" and dispatch._BACKENDS[("kl_div", "extra")] is entry
    assert dispatch.select_backend(CPU, torch.float32, "extra", op="kl_div") == "extra"
    assert dispatch.get_backend("extra", op="kl_div") is dispatch.get_backend("chunked", op="kl_div")


def test_the_default_op_is_the_mm_adapter():
    from mlan_kernels.backends import plain_torch
    assert dispatch.names() == dispatch.BACKENDS
    assert dispatch.get_backend("reference") is plain_torch
    assert dispatch.unavailable_reason("reference", CPU, torch.float64) is None


def test_an_unknown_op_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="^" + re.escape(
            "op must be one of ('mm_adapter', 'kl_div', 'grad_scale'), got 'softmax'") + "$"):
        dispatch.select_backend(CPU, torch.float32, op="softmax")


def test_auto_takes_the_preferred_backend_of_the_device_and_an_empty_env_means_auto(monkeypatch):
    for env in ("MLAN_BACKEND", "MLAN_KL_BACKEND", "MLAN_GRAD_SCALE_BACKEND"):
        monkeypatch.setenv(env, "")
    assert dispatch.select_backend(CPU, torch.float32) == ("cpu" if HAS_KL_CPU else "reference")
    assert dispatch.select_backend(CPU, torch.float32, op="kl_div") == ("cpu" if HAS_KL_CPU else "chunked")
    assert dispatch.select_backend(CPU, torch.float32, op="grad_scale") == "foreach"   # no preferred


def test_an_unavailable_preferred_backend_under_auto_warns_and_falls_back(monkeypatch):
    """float32 under auto: the preferred backend that cannot run is named in one warning
    (float64 falls back silently: the fallback is its only path)."""
    monkeypatch.delenv("MLAN_KL_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name, *rest, **kw: None if name == "chunked" else "gone")
    dispatch.reset_warnings()
    with pytest.warns(RuntimeWarning, match="^" + re.escape(
            "mlan_kernels: KL backend 'cpu' unavailable: gone; using 'chunked'") + "$"):
        assert dispatch.select_backend(CPU, torch.float32, op="kl_div") == "chunked"


def test_every_policy_names_only_registered_backends(monkeypatch):
    dispatch._check_policies()                                  # the shipped table
    for broken in (dispatch.Op("kl_div", "KL", "MLAN_KL_BACKEND", "nope"),
                   dispatch.Op("kl_div", "KL", "MLAN_KL_BACKEND", "chunked", (("cpu", ("cpu", "nope")),))):
        monkeypatch.setitem(dispatch.OPS, "kl_div", broken)
        with pytest.raises(ValueError, match="^" + re.escape("kl_div: backend 'nope' is named but not registered") + "$"):
            dispatch._check_policies()


def test_check_name_defaults_to_the_mm_adapter():
    dispatch.check_name("reference")
    with pytest.raises(ValueError, match="^backend must be one of"):
        dispatch.check_name("chunked")


@pytest.mark.parametrize("name, op, dtype, interpret, reason", [
    ("cuda", "mm_adapter", torch.float32, "1", "the cuda backend needs CUDA tensors"),
    ("triton", "grad_scale", torch.float32, "0", "triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing)"),
    ("triton", "kl_div", torch.float64, "1",
     "triton KL supports (torch.float32, torch.float16, torch.bfloat16), got torch.float64"),
    pytest.param("triton", "mm_adapter", torch.bfloat16, "1",
                 "the Triton interpreter (TRITON_INTERPRET=1) cannot compute bfloat16 correctly",
                 marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")),
    pytest.param("triton", "kl_div", torch.float32, "1", None,
                 marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))])
def test_unavailable_reasons_say_what_is_missing(monkeypatch, name, op, dtype, interpret, reason):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert dispatch.unavailable_reason(name, CPU, dtype, op=op) == reason


def test_a_backends_own_supports_check_is_asked_last(monkeypatch):
    """A backend module's supports(name, device, dtype) decides what the registry entry cannot."""
    seen = []
    chunked = dispatch.get_backend("chunked", op="kl_div")
    monkeypatch.setattr(chunked, "supports", lambda *args: seen.append(args) or "not today", raising=False)
    assert dispatch.unavailable_reason("chunked", CPU, torch.float16, op="kl_div") == "not today"
    assert seen == [("chunked", CPU, torch.float16)]


def test_a_backend_that_cannot_be_imported_is_named_with_the_import_error(monkeypatch):
    monkeypatch.setattr(dispatch, "_load", lambda module: (None, "No module named 'triton'"))
    with pytest.raises(RuntimeError, match="^" + re.escape(
            "mlan_kernels backend 'triton' is not available: No module named 'triton'") + "$"):
        dispatch.get_backend("triton", op="kl_div")
    assert dispatch.unavailable_reason("chunked", CPU, torch.float32, op="kl_div") == (
        "backend 'chunked' could not be imported (No module named 'triton')")
