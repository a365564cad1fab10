"""One behaviour per input on every backend: single_modality=True routes every sample by sample
0 (forward and gradients, against the fp64 oracle of exactly that), single_modality takes only
None/True/False, routing weights must be non-negative, and the Triton interpreter refuses bf16
(one warning, then the reference result instead of garbage)."""
import warnings

import pytest
import torch

from helpers import (BACKENDS, HAS_TRITON, assert_close_to_reference, explicit_weights, grads_of,
                     make_adapter_inputs, random_grad, run_op)
from mlan_kernels import dispatch, mm_adapter
from mlan_kernels.reference import mm_adapter_reference, routing_weights

SHAPE = (3, 7, 64, 8, 2, 2)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def first_sample_oracle(inputs, grad_y, weights=None, **hyper):
    """fp64 y and gradients when every sample uses sample 0's routing weights."""
    def adapter(x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias,
                weights=None):
        first = weights[:1] if weights is not None else routing_weights(
            x[:1, 0], router_weight, router_bias, 10.0)
        return mm_adapter_reference(x, down_weight, down_bias, up_weight, up_bias,
                                    weights=first.expand(x.shape[0], -1), **hyper)[0]
    inputs64 = {name: value.double() for name, value in inputs.items()}
    if weights is not None:
        inputs64["weights"] = weights.double()
    return grads_of(adapter, inputs64, grad_y.double())


@pytest.mark.parametrize("explicit", [False, True], ids=["router", "weights"])
def test_single_modality_true_routes_every_sample_by_sample_zero(backend, device, explicit):
    B, L, D, r, E, g = SHAPE
    inputs = make_adapter_inputs(*SHAPE, torch.float32, device)        # routing tokens differ
    weights = explicit_weights(B, E, torch.float32, device) if explicit else None
    if explicit:
        inputs["weights"] = weights
        assert not torch.allclose(weights[0], weights[1])
    else:
        per_sample = routing_weights(inputs["x"][:, 0], inputs["router_weight"],
                                     inputs["router_bias"], 10.0)
        assert (per_sample - per_sample[:1]).abs().max() > 1e-2
    grad_y = random_grad((B, L, D), torch.float32, device)
    y, grads = run_op(backend, inputs, grad_y, single_modality=True, groups=g)
    y_expected, grads_expected = first_sample_oracle(
        {k: v for k, v in inputs.items() if k != "weights"}, grad_y, weights, groups=g)
    assert_close_to_reference(y, y_expected, name="y")
    for name, expected in grads_expected.items():
        if expected is None:                        # the router, when weights are given
            assert grads[name] is None, name
            continue
        assert_close_to_reference(grads[name], expected, name=name)
    if explicit:                                    # rows 1.. were never used
        assert torch.count_nonzero(grads["weights"][1:]) == 0


@pytest.mark.parametrize("value", ["no", "yes", 1, 0, torch.tensor(True)])
def test_single_modality_takes_only_none_true_false(backend, device, value):
    inputs = make_adapter_inputs(*SHAPE, torch.float32, device)
    with pytest.raises(TypeError, match="single_modality must be None, True or False"):
        mm_adapter(**inputs, groups=2, backend=backend, single_modality=value)


def test_set_single_modality_refuses_non_bools():
    from mlan_kernels.integrations import patch_llama, set_single_modality
    from mlan_kernels.integrations.tiny import tiny_llama
    model = patch_llama(tiny_llama())
    for value in ("no", 1, 0.0):
        with pytest.raises(ValueError, match="value must be True, False or None"):
            set_single_modality(model, value)


def test_negative_routing_weights_that_sum_to_one_are_refused(backend):
    inputs = make_adapter_inputs(*SHAPE, torch.float32, "cpu")
    weights = torch.tensor([[1.5, -0.5], [0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(ValueError, match="weights must be routing weights: non-negative"):
        mm_adapter(**inputs, weights=weights, groups=2, backend=backend)
    nan_rows = torch.tensor([[float("nan"), 1.0], [0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(ValueError, match="non-negative"):
        mm_adapter(**inputs, weights=nan_rows, groups=2, backend=backend)


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(),
                    reason="the Triton interpreter runs without a GPU only")
def test_triton_interpreter_refuses_bf16_with_one_warning():
    assert dispatch.triton_interpreter()
    reason = dispatch.unavailable_reason("triton", torch.device("cpu"), torch.bfloat16)
    assert reason is not None and "bfloat16" in reason
    inputs = make_adapter_inputs(2, 5, 64, 8, 2, 2, torch.bfloat16, "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = mm_adapter(**inputs, groups=2, backend="triton")
        second = mm_adapter(**inputs, groups=2, backend="triton")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "'triton' unavailable" in messages[0] and "bfloat16" in messages[0]
    expected = mm_adapter(**inputs, groups=2, backend="reference")
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert dispatch.unavailable_reason("triton", torch.device("cpu"), torch.float16) is None
