"""Behaviour of the MM-Adapter's argument checks (ops/validation.py), stated as properties:
every valid corner (one group, rank one, one expert, one-hot or 16-bit-rounded routing weights,
a temperature below one) is accepted and computes the oracle's answer; every bad tensor
argument is named at the start of the error, whichever check catches it (missing, not a
tensor, wrong rank of dimensions, wrong dtype, other device); routing-weight values are checked
on the CPU only; and the dropout counter's limit B·L·r < 2^31 is exact."""
import pytest
import torch

from helpers import make_adapter_inputs
from mlan_kernels import mm_adapter
from mlan_kernels.ops.validation import validate_mm_adapter_args
from mlan_kernels.reference import mm_adapter_reference

B, L, D, R, E, G = 2, 3, 8, 4, 2, 2
TENSORS = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "router_weight", "router_bias")
HYPER = dict(scale=1.0, temperature=10.0, dropout_p=0.0, groups=G)


def _call(dim=D, rank=R, experts=E, groups=G, batch=B, device="cpu"):
    inputs = make_adapter_inputs(batch, L, dim, rank, experts, groups, torch.float32, "cpu")
    return {name: value.to(device) for name, value in inputs.items()}


def _validate(call, weights=None, **hyper):
    """validate_mm_adapter_args on a call dict (router tensors may be absent/None)."""
    options = {**HYPER, **hyper}
    single_modality = options.pop("single_modality", None)
    return validate_mm_adapter_args(
        call["x"], call["down_weight"], call["down_bias"], call["up_weight"], call["up_bias"],
        call.get("router_weight"), call.get("router_bias"), weights, options["scale"],
        options["temperature"], options["dropout_p"], options["groups"], single_modality)


def _explicit(call, weights):
    return {**{name: call[name] for name in TENSORS[:5]}, "weights": weights}


def _matches_oracle(call, groups, **options):
    y = mm_adapter(**call, groups=groups, backend="reference", **options)
    expected = mm_adapter_reference(**call, groups=groups, **options)[0]
    torch.testing.assert_close(y, expected)


# ---------------------------------------------------------------- valid corners are accepted
@pytest.mark.parametrize("rank, experts, groups", [(4, 2, 1), (1, 2, 1), (4, 1, 2), (1, 1, 1)],
                         ids=["one-group", "rank-one", "one-expert", "all-one"])
def test_the_smallest_valid_sizes_are_accepted(rank, experts, groups):
    call = _call(rank=rank, experts=experts, groups=groups)
    assert _validate(call, groups=groups) == (B, L, D, rank, experts)
    _matches_oracle(call, groups)


@pytest.mark.parametrize("weights", [
    [[0.3, 0.7], [0.3, 0.7]],                 # columns do not sum to 1: only rows must
    [[1.0, 0.0], [0.0, 1.0]],                 # one-hot: zeros are valid weights
    [[0.6004, 0.4], [0.5, 0.4992]],           # within 1e-3 of 1 (16-bit rounded softmax)
], ids=["rows-sum-to-1", "one-hot", "rounded"])
def test_routing_weights_that_sum_to_one_per_sample_are_accepted(weights):
    weights = torch.tensor(weights)
    call = _explicit(_call(), weights)
    assert _validate(call, weights=weights) == (B, L, D, R, E)
    _matches_oracle(call, G)


def test_routing_weights_of_three_samples_over_two_experts_are_accepted():
    weights = torch.tensor([[0.2, 0.8], [0.5, 0.5], [1.0, 0.0]])
    call = _explicit(_call(batch=3), weights)
    _matches_oracle(call, G)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_any_positive_temperature_is_accepted(temperature):
    _matches_oracle(_call(), G, temperature=temperature)


@pytest.mark.parametrize("single_modality", [None, True, False])
def test_single_modality_accepts_none_true_false(single_modality):
    y = mm_adapter(**_call(), groups=G, single_modality=single_modality, backend="reference")
    assert y.shape == (B, L, D) and torch.isfinite(y).all()


# ---------------------------------------------------------------- bad arguments are named first
@pytest.mark.parametrize("value", ["yes", 1, 0])
def test_single_modality_that_is_not_a_bool_or_none_is_rejected_by_name(value):
    with pytest.raises(TypeError, match=rf"^single_modality must be None, True or False, got {value!r}$"):
        mm_adapter(**_call(), groups=G, single_modality=value)


@pytest.mark.parametrize("name", TENSORS)
def test_a_missing_required_tensor_is_named(name):
    call = {**_call(), name: None}
    with pytest.raises(TypeError, match=rf"^{name} must be a torch.Tensor, got None$"):
        _validate(call)


@pytest.mark.parametrize("name", TENSORS)
def test_a_tensor_given_as_a_list_is_named_with_its_type(name):
    call = _call()
    call[name] = call[name].tolist()
    with pytest.raises(TypeError, match=rf"^{name} must be a torch.Tensor, got list$"):
        _validate(call)


@pytest.mark.parametrize("name", TENSORS + ("weights",))
def test_a_tensor_with_the_wrong_number_of_dimensions_is_named(name):
    call, weights = _call(), None
    if name == "weights":
        call, weights = _explicit(call, torch.full((B, E, 1), 1.0 / E)), torch.full((B, E, 1), 1.0 / E)
    else:
        call[name] = call[name][None]
    ndim = {"x": 3, "down_weight": 2, "down_bias": 1, "up_weight": 3, "up_bias": 2,
            "router_weight": 2, "router_bias": 1, "weights": 2}[name]
    with pytest.raises(ValueError, match=rf"^{name} must have {ndim} dimensions, got shape "):
        _validate(call, weights=weights)


@pytest.mark.parametrize("name", TENSORS)
def test_an_integer_tensor_is_named_with_the_allowed_dtypes(name):
    call = _call()
    call[name] = call[name].to(torch.int64)
    with pytest.raises(TypeError, match=rf"^{name} has dtype torch.int64; expected one of "
                                        r"float32, float16, bfloat16, float64$"):
        _validate(call)


def test_integer_one_hot_routing_weights_are_rejected_by_dtype():
    weights = torch.tensor([[1, 0], [0, 1]])
    with pytest.raises(TypeError, match=r"^weights has dtype torch.int64; expected one of "
                                        r"float32, float64, float16, bfloat16$"):
        mm_adapter(**_explicit(_call(), weights), groups=G)


@pytest.mark.parametrize("name", TENSORS[1:] + ("weights",))
def test_a_tensor_on_another_device_is_named(name):
    call, weights = _call(), None
    if name == "weights":
        weights = torch.full((B, E), 1.0 / E, device="meta")
        call = _explicit(call, weights)
    else:
        call[name] = call[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{name} is on meta but x is on cpu; "):
        _validate(call, weights=weights)


def test_a_rank_of_zero_is_named_with_the_shape():
    call = _call()
    call["down_weight"], call["down_bias"] = torch.zeros(0, D), torch.zeros(0)
    with pytest.raises(ValueError, match=r"^down_weight must be \[r, D\] with r >= 1, got shape \[0, 8\]$"):
        _validate(call)


def test_the_expected_up_weight_shape_is_shown_in_whole_numbers():
    call = _call()
    call["up_weight"] = torch.zeros(E, D, R)
    with pytest.raises(ValueError, match=rf"^up_weight must have shape \[{E}, {D}, {R // G}\], "
                                         rf"got \[{E}, {D}, {R}\]$"):
        _validate(call)


@pytest.mark.parametrize("name, value", [("scale", "1"), ("temperature", float("inf")),
                                         ("dropout_p", float("nan")), ("dropout_p", "0.1")])
def test_a_hyperparameter_that_is_not_a_finite_number_is_named(name, value):
    with pytest.raises(TypeError, match=rf"^{name} must be a finite float, got "):
        _validate(_call(), **{name: value})


# ---------------------------------------------------------------- routing-weight values
@pytest.mark.parametrize("weights", [[[1.5, -0.5], [0.5, 0.5]], [[float("nan"), 1.0], [0.5, 0.5]]],
                         ids=["negative", "nan"])
def test_negative_or_nan_routing_weights_are_rejected_even_when_rows_sum_to_one(weights):
    weights = torch.tensor(weights)
    with pytest.raises(ValueError, match=r"^weights must be routing weights: non-negative \(and not "
                                         r"nan\), summing to 1 over the last \(expert\) dimension$"):
        _validate(_explicit(_call(), weights), weights=weights)


@pytest.mark.parametrize("weights", [[[0.6, 0.402], [0.5, 0.5]], [[0.5, 0.5], [0.25, 0.25]]])
def test_rows_off_one_by_more_than_the_rounding_are_rejected(weights):
    weights = torch.tensor(weights)
    with pytest.raises(ValueError, match=r"^weights must be routing weights summing to 1 over the "
                                         r"last \(expert\) dimension$"):
        _validate(_explicit(_call(), weights), weights=weights)


def test_routing_weight_values_are_not_read_off_the_cpu():
    """Off the CPU only shapes are checked (no device sync per call): meta tensors, which have
    no values, validate like real ones."""
    call = _call(device="meta")
    weights = torch.full((B, E), 1.0 / E, device="meta")
    assert _validate(_explicit(call, weights), weights=weights) == (B, L, D, R, E)


# ---------------------------------------------------------------- the dropout counter's limit
@pytest.mark.parametrize("batch, length, fits", [(2**14, 2**14, False), (2**14, 2**14 - 1, True),
                                                 (2**15, 2**14, False), (1, 2**28, False),
                                                 (2**28 - 1, 1, True)])
def test_more_than_two_to_the_31_dropout_counters_are_rejected_naming_x(batch, length, fits):
    rank = 8                                                          # B·L·r vs 2^31
    call = _call(rank=rank, groups=1, device="meta")
    call["x"] = torch.empty(batch, length, D, device="meta")
    if fits:
        assert _validate(call, groups=1) == (batch, length, D, rank, E)
    else:
        with pytest.raises(ValueError, match=rf"^x has too many tokens for the dropout counter: "
                                             rf"B\*L\*r must be < 2\^31, got {batch}\*{length}\*{rank}$"):
            _validate(call, groups=1)
