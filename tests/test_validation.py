"""Bad arguments to `mm_adapter` raise ValueError/TypeError naming the argument."""
import pytest
import torch

from helpers import make_adapter_inputs
from mlan_kernels import mm_adapter

B, L, D, R, E, G = 2, 3, 8, 4, 2, 2


def _valid_call():
    """Keyword arguments of a valid call (CPU fp32) that each case below breaks in one place."""
    return dict(make_adapter_inputs(B, L, D, R, E, G, torch.float32, "cpu"), groups=G)


def _set(**changes):
    return lambda call: call.update(changes)


def _replace(name, make):
    """Replace argument `name` by make(current value)."""
    return lambda call: call.update({name: make(call[name])})


def _no_router(call):
    call.update(router_weight=None, router_bias=None)


def _weights(value):
    def apply(call):
        _no_router(call)
        call["weights"] = value
    return apply


# (id, how to break the valid call, the argument the message must name)
CASES = [
    ("x-not-3d", _replace("x", lambda x: x[0]), "x"),
    ("x-int-dtype", _replace("x", lambda x: x.to(torch.int32)), "x"),
    ("x-not-tensor", _replace("x", lambda x: x.tolist()), "x"),
    ("down_weight-D-mismatch", _replace("down_weight", lambda w: torch.randn(R, D + 2)), "down_weight"),
    ("down_bias-wrong-length", _set(down_bias=torch.zeros(R + 1)), "down_bias"),
    ("r-not-divisible-by-groups", _set(groups=4, down_weight=torch.randn(6, D),   # D=8 is fine
                                       down_bias=torch.zeros(6)), "groups"),
    ("D-not-divisible-by-groups", _set(groups=3, down_weight=torch.randn(6, D),
                                       down_bias=torch.zeros(6)), "groups"),
    ("zero-experts", _set(up_weight=torch.zeros(0, D, R // G), up_bias=torch.zeros(0, D)), "up_weight"),
    ("up_weight-wrong-r/g", _set(up_weight=torch.zeros(E, D, R)), "up_weight"),
    ("up_weight-wrong-D", _set(up_weight=torch.zeros(E, D + 2, R // G)), "up_weight"),
    ("up_bias-wrong-shape", _set(up_bias=torch.zeros(E, D + 1)), "up_bias"),
    ("up_bias-wrong-E", _set(up_bias=torch.zeros(E + 1, D)), "up_bias"),
    ("router_weight-wrong-E", _set(router_weight=torch.randn(E + 1, D)), "router_weight"),
    ("router_bias-wrong-shape", _set(router_bias=torch.zeros(E + 1)), "router_bias"),
    ("router-missing-no-weights", _no_router, "router_weight"),
    ("weights-not-BxE", _weights(torch.full((B + 1, E), 1.0 / E)), "weights"),
    ("weights-3d", _weights(torch.full((B, E, 1), 1.0 / E)), "weights"),
    ("weights-not-summing-to-1", _weights(torch.full((B, E), 0.3)), "weights"),
    ("weights-int-dtype", _weights(torch.ones(B, E, dtype=torch.int64)), "weights"),
    ("temperature-zero", _set(temperature=0.0), "temperature"),
    ("temperature-negative", _set(temperature=-1.0), "temperature"),
    ("temperature-nan", _set(temperature=float("nan")), "temperature"),
    ("dropout_p-one", _set(dropout_p=1.0), "dropout_p"),
    ("dropout_p-negative", _set(dropout_p=-0.1), "dropout_p"),
    ("groups-zero", _set(groups=0), "groups"),
    ("groups-float", _set(groups=2.0), "groups"),
    ("param-on-other-device", _replace("down_weight", lambda w: w.to("meta")), "down_weight"),
    ("param-int64", _replace("up_bias", lambda b: b.to(torch.int64)), "up_bias"),
    ("scale-nan", _set(scale=float("nan")), "scale"),
    ("scale-string", _set(scale="1.0"), "scale"),
    ("backend-unknown", _set(backend="tpu"), "backend"),
]


@pytest.mark.parametrize("breaks, argument", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_argument_is_named(breaks, argument):
    call = _valid_call()
    mm_adapter(**call)                       # the unbroken call is valid
    breaks(call)
    # "x" is a word in other messages too ("... but x is on cpu"): require it to lead.
    pattern = r"^x\b" if argument == "x" else rf"\b{argument}\b"
    with pytest.raises((ValueError, TypeError), match=pattern):
        mm_adapter(**call)
