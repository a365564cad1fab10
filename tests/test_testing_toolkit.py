"""mlan_kernels.testing: the comparator fails loudly and precisely, the table's scale, the
low-precision rule, the input builder and the timer."""
import math

import pytest
import torch

from helpers import (TOLERANCES, assert_close_to_reference, assert_verbose_allclose,
                     assert_within_pytorch_error, make_adapter_inputs, random_grad, reference_error)
from mlan_kernels.testing import measure


def test_verbose_allclose_lists_the_first_mismatches():
    expected = torch.zeros(3, 4)
    actual = expected.clone()
    actual[1, 2], actual[2, 0] = 1.0, -2.0
    with pytest.raises(AssertionError) as error:
        assert_verbose_allclose(actual, expected, atol=0.5, rtol=0.0, name="grad_x")
    message = str(error.value)
    assert message.startswith("grad_x: 2 of 12 elements")
    assert "at (1, 2): got 1, expected 0" in message and "at (2, 0): got -2, expected 0" in message
    assert "largest finite |diff| 2" in message
    assert_verbose_allclose(actual, expected, atol=2.0, rtol=0.0)            # within atol


def test_verbose_allclose_is_nan_and_inf_aware():
    expected = torch.tensor([1.0, math.nan, math.inf, -math.inf])
    assert_verbose_allclose(expected.clone(), expected)                      # same nan/inf pass
    for wrong in ([1.0, 0.0, math.inf, -math.inf], [1.0, math.nan, -math.inf, -math.inf],
                  [math.nan, math.nan, math.inf, -math.inf]):
        with pytest.raises(AssertionError):
            assert_verbose_allclose(torch.tensor(wrong), expected, atol=1e3)
    with pytest.raises(AssertionError, match="shape"):
        assert_verbose_allclose(torch.zeros(2), torch.zeros(3))


def test_the_table_scales_atol_by_the_largest_reference_magnitude():
    tolerance = TOLERANCES[torch.float32]
    expected = torch.tensor([100.0, 0.0])
    assert_close_to_reference(torch.tensor([100.0, 0.9 * tolerance * 100]), expected)
    with pytest.raises(AssertionError):
        assert_close_to_reference(torch.tensor([100.0, 1.1 * tolerance * 100]), expected)
    small = torch.tensor([1e-3, 0.0])                                         # floor of 1
    assert_close_to_reference(torch.tensor([1e-3, 0.9 * tolerance]), small)
    with pytest.raises(AssertionError):
        assert_close_to_reference(torch.tensor([1e-3, 1.1 * tolerance]), small)
    assert reference_error(torch.tensor([102.0]), torch.tensor([100.0])) == pytest.approx(0.02)
    assert reference_error(torch.tensor([0.5]), torch.tensor([0.25])) == pytest.approx(0.25)
    assert reference_error(torch.tensor([math.nan]), torch.tensor([1.0])) == math.inf
    assert reference_error(torch.zeros(0), torch.zeros(0)) == 0.0
    assert_close_to_reference(torch.tensor([1.0 + 0.9 * TOLERANCES[torch.bfloat16]]),
                              torch.tensor([1.0]), dtype=torch.bfloat16)


def test_low_precision_rule_bounds_our_error_by_pytorchs():
    reference = torch.linspace(-1, 1, 100, dtype=torch.float64)
    pytorch = reference.to(torch.bfloat16)                                    # error ~ 2e-3
    assert_within_pytorch_error(reference.to(torch.float32), pytorch, reference)
    with pytest.raises(AssertionError, match="× PyTorch's"):
        assert_within_pytorch_error(pytorch + 0.01, pytorch, reference, factor=2.0)
    assert_within_pytorch_error(pytorch + 0.01, pytorch, reference, factor=2.0, floor=0.02)
    assert_within_pytorch_error(torch.zeros(0), torch.zeros(0), torch.zeros(0))    # nothing to compare


def test_the_builder_is_deterministic_and_shaped():
    first = make_adapter_inputs(2, 5, 16, 4, 3, 2, torch.float16, "cpu", param_dtype=torch.float32)
    again = make_adapter_inputs(2, 5, 16, 4, 3, 2, torch.float16, "cpu", param_dtype=torch.float32)
    shapes = {"x": (2, 5, 16), "down_weight": (4, 16), "down_bias": (4,), "up_weight": (3, 16, 2),
              "up_bias": (3, 16), "router_weight": (3, 16), "router_bias": (3,)}
    assert {name: tuple(value.shape) for name, value in first.items()} == shapes
    assert first["x"].dtype == torch.float16 and first["down_weight"].dtype == torch.float32
    assert all(torch.equal(first[name], again[name]) for name in first)
    identity = make_adapter_inputs(2, 5, 16, 4, 3, 2, torch.float16, "cpu", nonzero=False)
    assert torch.equal(identity["x"], first["x"]) and not identity["up_weight"].any()
    single = make_adapter_inputs(2, 5, 16, 4, 3, 2, torch.float32, "cpu", single_modality=True)
    assert torch.equal(single["x"][1, 0], single["x"][0, 0])
    assert not torch.equal(single["x"][1, 1], single["x"][0, 1])
    assert torch.equal(random_grad((2, 3), torch.float32, "cpu"), random_grad((2, 3), torch.float32, "cpu"))


def test_measure_times_every_call_after_the_warm_up():
    calls = []
    result = measure(lambda: calls.append(1), "cpu", warmup=2, iters=3)
    assert len(calls) == 5 and result["iters"] == 3
    assert 0 <= result["min_ms"] <= result["median_ms"]
