"""Behaviour of the oracle (mlan_kernels/reference/), checked against definitions written out
here independently of it: the router is softmax((W_R x[b, 0] + b_R) / t) computed in fp32 (fp64
for fp64 inputs), the forward is docs/mm_adapter.md's formula with the grouped up-projection
applied group by group, and Philox4x32-10 gives the published known answer and keys on all 64
bits of the seed (against a scalar Python Philox written from Random123's definition)."""
import pytest
import torch

from helpers import explicit_weights, make_adapter_inputs
from mlan_kernels.reference import (dropout_keep_mask, mm_adapter_reference, philox_uint32,
                                    routing_weights)


def _router_by_hand(x0, router_weight, router_bias, temperature):
    """softmax((W_R x0 + b_R) / t) in fp64, sample by sample, expert by expert."""
    x0, router_weight, router_bias = (t.double() for t in (x0, router_weight, router_bias))
    out = torch.empty(x0.shape[0], router_weight.shape[0], dtype=torch.float64)
    for b in range(x0.shape[0]):
        logits = [(x0[b] * router_weight[e]).sum() + router_bias[e] for e in range(router_weight.shape[0])]
        exps = torch.stack([torch.exp(z / temperature) for z in logits])
        out[b] = exps / exps.sum()
    return out


@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
def test_router_is_the_softmax_of_the_logits_over_the_temperature(temperature):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    router_weight = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    router_bias = torch.randn(4, generator=generator, dtype=torch.float64)
    weights = routing_weights(x0, router_weight, router_bias, temperature)
    torch.testing.assert_close(weights, _router_by_hand(x0, router_weight, router_bias, temperature),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_dtype, param_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                  (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.float64)])
def test_router_of_16_and_32_bit_inputs_is_computed_and_returned_in_fp32(x_dtype, param_dtype):
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 64, generator=generator).to(x_dtype)
    router_weight = (torch.randn(3, 64, generator=generator) * 2).to(param_dtype)
    router_bias = torch.randn(3, generator=generator).to(param_dtype)
    weights = routing_weights(x0, router_weight, router_bias, 1.0)
    assert weights.dtype == torch.float32
    # fp32 arithmetic on the 16-bit values; a 16-bit matmul would be off by ~1e-2
    torch.testing.assert_close(weights.double(), _router_by_hand(x0, router_weight, router_bias, 1.0),
                               rtol=0, atol=1e-5)


def _forward_by_hand(x, down_weight, down_bias, up_weight, up_bias, weights, scale, groups, keep, p):
    """y = x + s Σ_e w_e (up_e(h) + b_U[e]), h = dropout(x W_Aᵀ + b_A); up_e applies group k's
    [D/g, r/g] block of up_weight[e] to hidden block k (LaVIN's grouped 1x1 conv). fp64."""
    x64 = x.double()
    h = x64 @ down_weight.double().t() + down_bias.double()
    if keep is not None:
        h = h * keep.view_as(h) / (1 - p)
    experts, dim, rank_per_group = up_weight.shape
    y = x64.clone()
    for e in range(experts):
        up = torch.empty_like(x64)
        for k in range(groups):
            channels = slice(k * dim // groups, (k + 1) * dim // groups)
            hidden = slice(k * rank_per_group, (k + 1) * rank_per_group)
            up[..., channels] = h[..., hidden] @ up_weight[e, channels].double().t()
        y = y + scale * weights[:, e, None, None].double() * (up + up_bias[e].double())
    return y, h


@pytest.mark.parametrize("routing", ["router", "explicit"])
@pytest.mark.parametrize("groups, experts, dropout_p", [(1, 1, 0.0), (2, 3, 0.0), (4, 2, 0.25)])
def test_forward_is_the_documented_formula(routing, groups, experts, dropout_p):
    B, L, D, R, scale, temperature, seed = 2, 3, 8, 4, 0.7, 3.0, 5
    inputs = make_adapter_inputs(B, L, D, R, experts, groups, torch.float64, "cpu")
    if routing == "router":
        weights = _router_by_hand(inputs["x"][:, 0], inputs["router_weight"], inputs["router_bias"], temperature)
        call = dict(inputs)
    else:
        weights = explicit_weights(B, experts, torch.float64, "cpu")
        call = {**{k: v for k, v in inputs.items() if not k.startswith("router")}, "weights": weights}
    keep = dropout_keep_mask(seed, B * L, R, dropout_p) if dropout_p else None
    if keep is not None:
        assert 0 < keep.sum() < keep.numel()
    y, h, w = mm_adapter_reference(**call, scale=scale, temperature=temperature, dropout_p=dropout_p,
                                   seed=seed, groups=groups)
    y_hand, h_hand = _forward_by_hand(inputs["x"], inputs["down_weight"], inputs["down_bias"],
                                      inputs["up_weight"], inputs["up_bias"], weights, scale, groups,
                                      keep, dropout_p)
    torch.testing.assert_close(w, weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_hand, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_forward_computes_in_fp32_and_returns_y_in_the_input_dtype(dtype):
    inputs = make_adapter_inputs(2, 3, 8, 4, 2, 2, dtype, "cpu")
    y, h, w = mm_adapter_reference(**inputs, scale=0.5, groups=2)
    assert (y.dtype, h.dtype, w.dtype) == (dtype, torch.float32, torch.float32)
    weights = _router_by_hand(inputs["x"][:, 0], inputs["router_weight"], inputs["router_bias"], 10.0)
    y_hand, _ = _forward_by_hand(inputs["x"], inputs["down_weight"], inputs["down_bias"],
                                 inputs["up_weight"], inputs["up_bias"], weights, 0.5, 2, None, 0.0)
    torch.testing.assert_close(y, y_hand.to(dtype))      # one rounding of an fp32 result


def test_philox_gives_the_published_known_answer():
    """Random123's known-answer vector for Philox4x32-10: counter 0, key 0 -> 0x6627e8d5 first."""
    assert philox_uint32(0, torch.tensor([0])).tolist() == [0x6627E8D5]


def philox_first_word(key: int, counter: int) -> int:
    """Philox4x32-10 on Python ints, written from Random123's definition (counter (c, 0, 0, 0),
    64-bit key split low/high): the first output word."""
    mask = 0xFFFFFFFF
    c, k = [counter & mask, 0, 0, 0], [key & mask, (key >> 32) & mask]
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & mask, (p0 >> 32) ^ c[3] ^ k[1], p0 & mask]
        k = [(k[0] + 0x9E3779B9) & mask, (k[1] + 0xBB67AE85) & mask]
    return c[0]


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 0x1234567890ABCDEF, 2**64 - 1])
def test_philox_keys_with_all_64_seed_bits(seed):
    """Every bit of the seed is part of the key (the high 32 bits are k1), as in Triton's
    tl.randint: checked against a scalar Python Philox, also for the largest counters."""
    counters = [0, 1, 12345, 2**32 - 1]
    assert philox_first_word(0, 0) == 0x6627E8D5                   # the known answer again
    want = [philox_first_word(seed, c) for c in counters]
    key = seed if seed < 2**63 else seed - 2**64                   # as an int64 tensor holds it
    assert philox_uint32(seed if seed < 2**63 else key, torch.tensor(counters)).tolist() == want
    assert philox_uint32(torch.tensor(key), torch.tensor(counters)).tolist() == want


def test_the_oracles_defaults_are_the_ops_defaults():
    """Called without options, the oracle computes what mm_adapter computes without options
    (scale 1, temperature 10, no dropout, one group)."""
    from mlan_kernels import mm_adapter
    inputs = make_adapter_inputs(2, 3, 8, 4, 2, 1, torch.float64, "cpu")
    y, h, _ = mm_adapter_reference(**inputs)
    torch.testing.assert_close(y, mm_adapter(**inputs, backend="reference"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, inputs["x"] @ inputs["down_weight"].t() + inputs["down_bias"],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_dtype, weights_dtype", [(torch.float64, torch.float32),
                                                    (torch.float32, torch.bfloat16)])
def test_given_routing_weights_of_another_dtype_act_as_their_values(x_dtype, weights_dtype):
    inputs = make_adapter_inputs(2, 3, 8, 4, 2, 2, x_dtype, "cpu")
    call = {k: v for k, v in inputs.items() if not k.startswith("router")}
    weights = explicit_weights(2, 2, torch.float64, "cpu").to(weights_dtype)
    y, _, w = mm_adapter_reference(**call, weights=weights, groups=2)
    y_same, _, _ = mm_adapter_reference(**call, weights=weights.to(x_dtype), groups=2)
    assert w.dtype == torch.promote_types(x_dtype, torch.float32)
    torch.testing.assert_close(y, y_same, rtol=0, atol=0)


def test_fp32_activations_with_fp64_parameters_compute_in_fp32():
    """The compute dtype follows x (fp32 unless x is fp64), whatever the parameters' dtype."""
    inputs = make_adapter_inputs(2, 3, 8, 4, 2, 2, torch.float64, "cpu")
    inputs["x"] = inputs["x"].float()
    y, h, w = mm_adapter_reference(**inputs, scale=0.5, dropout_p=0.25, seed=3, groups=2)
    assert (y.dtype, h.dtype, w.dtype) == (torch.float32, torch.float32, torch.float32)
    fp32 = {k: v.float() for k, v in inputs.items()}
    expected = mm_adapter_reference(**fp32, scale=0.5, dropout_p=0.25, seed=3, groups=2)
    for got, want in zip((y, h, w), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_the_oracle_runs_on_the_device_of_its_inputs(dropout_p):
    """Every intermediate, the dropout mask included, lives on x's device (meta: shapes only)."""
    inputs = {k: v.to("meta") for k, v in make_adapter_inputs(2, 3, 8, 4, 2, 2, torch.float32, "cpu").items()}
    y, h, w = mm_adapter_reference(**inputs, dropout_p=dropout_p, seed=3, groups=2)
    assert [t.device.type for t in (y, h, w)] == ["meta"] * 3
    assert (y.shape, h.shape, w.shape) == ((2, 3, 8), (2, 3, 4), (2, 2))


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_the_keep_mask_is_a_bool_token_by_unit_mask_on_the_requested_device(p, device):
    """Same type for every p: [num_tokens, rank] bool on `device`; p = 0 keeps every unit and
    p = 1 keeps none (a unit is kept when its 24-bit value is >= round(p · 2^24))."""
    keep = dropout_keep_mask(seed=4, num_tokens=5, rank=3, p=p, device=device)
    assert (keep.shape, keep.dtype, keep.device.type) == ((5, 3), torch.bool, device)
    if device == "cpu" and p in (0.0, 1.0):
        assert keep.all() if p == 0.0 else not keep.any()


def test_a_unit_whose_random_value_equals_the_threshold_is_kept():
    """keep[n, i] = (philox(seed, n·r + i) >> 8) >= round(p · 2^24) (the definition every backend
    regenerates): with p set so the threshold is exactly unit 0's value, unit 0 is kept and
    exactly the units with smaller values are dropped."""
    seed, tokens, rank = 9, 16, 4
    bits24 = philox_uint32(seed, torch.arange(tokens * rank)) >> 8
    p = bits24[0].item() / 2**24
    keep = dropout_keep_mask(seed, tokens, rank, p)
    assert keep[0, 0]
    assert torch.equal(keep.flatten(), bits24 >= bits24[0])
