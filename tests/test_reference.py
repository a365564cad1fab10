"""The oracle (mlan_kernels/reference/) and the reference backend's hand-written backward
(mlan_kernels/backends/plain_torch.py)."""
import pytest
import torch

from helpers import (HAS_TRITON, TEMPERATURE, explicit_weights, make_adapter_inputs,
                     oracle, random_grad)
from mlan_kernels import mm_adapter
from mlan_kernels.backends import plain_torch as reference_backend
from mlan_kernels.reference import (compact_up_weight, dense_up_weight, dropout_keep_mask,
                                    mm_adapter_reference, philox_uint32, routing_weights)

TOKEN_NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias")

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _randint_kernel(out_ptr, seed, first_counter, count, BLOCK: tl.constexpr):
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        bits = tl.randint(seed, first_counter + index)                  # uint32
        tl.store(out_ptr + index, bits.to(tl.int32, bitcast=True), mask=index < count)


# ---------------------------------------------------------------- Philox dropout
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("first_counter", [0, 2**31 - 600], ids=["low", "high"])
@pytest.mark.parametrize("seed", [0, 1, 20240605, 2**31 - 1, 2**40 + 12345])
def test_philox_matches_triton_randint(seed, first_counter, device):
    count = 500
    out = torch.empty(count, dtype=torch.int32, device=device)
    _randint_kernel[(triton.cdiv(count, 256),)](out, seed, first_counter, count, BLOCK=256)
    counter = torch.arange(first_counter, first_counter + count, dtype=torch.int64, device=device)
    expected = philox_uint32(seed, counter)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, expected)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_mask_keeps_expected_fraction(p):
    tokens, rank = 4096, 32
    keep = dropout_keep_mask(seed=7, num_tokens=tokens, rank=rank, p=p).double()
    # 6 standard deviations of a binomial proportion: fails by chance with prob. ~1e-9.
    sigma_all = (p * (1 - p) / (tokens * rank)) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 6 * sigma_all
    sigma_unit = (p * (1 - p) / tokens) ** 0.5          # every hidden unit drops at rate p
    assert ((keep.mean(0) - (1 - p)).abs() < 6 * sigma_unit).all()
    other = dropout_keep_mask(seed=8, num_tokens=tokens, rank=rank, p=p).double()
    agreement = (keep == other).double().mean().item()  # independent masks: p² + (1-p)²
    assert abs(agreement - (p * p + (1 - p) ** 2)) < 6 * sigma_all


def test_dropout_p0_keeps_everything(device):
    assert dropout_keep_mask(seed=3, num_tokens=11, rank=8, p=0.0).all()
    inputs = make_adapter_inputs(2, 3, 16, 8, 2, 2, torch.float64, device)
    _, h, _ = mm_adapter_reference(**inputs, dropout_p=0.0, seed=3, groups=2)
    expected = inputs["x"] @ inputs["down_weight"].t() + inputs["down_bias"]
    torch.testing.assert_close(h, expected, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- grouped up-projection
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_dense_compact_round_trip_and_block_structure(groups):
    experts, dim, rank = 3, 16, 8
    up_weight = torch.randn(experts, dim, rank // groups, dtype=torch.float64)
    dense = dense_up_weight(up_weight, groups)
    assert dense.shape == (experts, dim, rank)
    assert torch.equal(compact_up_weight(dense, groups), up_weight)

    channel_block = torch.arange(dim) // (dim // groups)
    hidden_block = torch.arange(rank) // (rank // groups)
    on_diagonal = channel_block[:, None] == hidden_block[None, :]           # [D, r]
    assert (dense[:, ~on_diagonal] == 0).all()
    for j in range(dim):            # channel j reads hidden block j // (D/g) with weights up[:, j]
        block = slice(channel_block[j] * (rank // groups), (channel_block[j] + 1) * (rank // groups))
        assert torch.equal(dense[:, j, block], up_weight[:, j])

    # The same projection as LaVIN's grouped 1x1 Conv1d (weight [D, r/g, 1], groups=g).
    hidden = torch.randn(5, rank, dtype=torch.float64)
    for e in range(experts):
        conv = torch.nn.functional.conv1d(hidden[:, :, None], up_weight[e, :, :, None], groups=groups)
        torch.testing.assert_close(conv[:, :, 0], hidden @ dense[e].t(), atol=1e-12, rtol=0)

    arbitrary = torch.randn(experts, dim, rank, dtype=torch.float64)  # compact keeps the diagonal
    assert torch.equal(dense_up_weight(compact_up_weight(arbitrary, groups), groups),
                       arbitrary * on_diagonal)


# ---------------------------------------------------------------- reference backend backward
@pytest.mark.parametrize("routing", ["router", "explicit"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("experts", [1, 2, 3])
def test_reference_backward_matches_autograd(experts, groups, dropout_p, routing, device):
    """backends/plain_torch.backward == autograd of the oracle with the routing weights as a leaf
    (the backend's contract: token-wise grads and ∂w; the op adds the router term itself)."""
    batch, length, dim, rank = 3, 5, 8, 4
    inputs = make_adapter_inputs(batch, length, dim, rank, experts, groups, torch.float64, device)
    if routing == "router":
        weights = routing_weights(inputs["x"][:, 0], inputs["router_weight"],
                                  inputs["router_bias"], TEMPERATURE)
    else:
        weights = explicit_weights(batch, experts, torch.float64, device)
    token_inputs = [inputs[name] for name in TOKEN_NAMES]
    hyper = dict(scale=0.7, dropout_p=dropout_p, seed=11, groups=groups)
    grad_y = random_grad((batch, length, dim), torch.float64, device)
    y_expected, grads_expected = oracle(
        {**{name: inputs[name] for name in TOKEN_NAMES}, "weights": weights}, grad_y, **hyper)

    y, h = reference_backend.forward(*token_inputs, weights, 0.7, dropout_p, 11, groups, False)
    torch.testing.assert_close(y, y_expected, atol=1e-10, rtol=0)
    grads = reference_backend.backward(grad_y, inputs["x"], h, weights, *token_inputs[1:],
                                       0.7, dropout_p, 11, groups)
    for name, grad in zip(TOKEN_NAMES + ("weights",), grads):
        torch.testing.assert_close(grad, grads_expected[name], atol=1e-10, rtol=0, msg=name)


# ---------------------------------------------------------------- gradcheck (fp64)
GRADCHECK_HYPER = dict(scale=0.8, temperature=TEMPERATURE, dropout_p=0.3, seed=5, groups=2)


def _gradcheck_inputs(routing):
    """Tiny fp64 leaves: (names, tensors). Dropout with this seed drops some units, not all."""
    inputs = make_adapter_inputs(2, 3, 4, 4, 2, 2, torch.float64, device="cpu")
    keep = dropout_keep_mask(GRADCHECK_HYPER["seed"], 2 * 3, 4, GRADCHECK_HYPER["dropout_p"])
    assert 0 < keep.sum() < keep.numel()
    if routing == "explicit":
        inputs = {name: inputs[name] for name in TOKEN_NAMES}
        inputs["weights"] = explicit_weights(2, 2, torch.float64, device="cpu")
    return list(inputs), [value.clone().requires_grad_() for value in inputs.values()]


@pytest.mark.parametrize("routing", ["router", "explicit"])
@pytest.mark.parametrize("function", ["oracle", "op"])
def test_gradcheck(function, routing):
    names, tensors = _gradcheck_inputs(routing)
    if function == "oracle":
        def fn(*args):
            return mm_adapter_reference(**dict(zip(names, args)), **GRADCHECK_HYPER)[0]
    else:
        def fn(*args):
            return mm_adapter(**dict(zip(names, args)), backend="reference", **GRADCHECK_HYPER)
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-8)


# ---------------------------------------------------------------- opcheck
def _op_args(routing, backend="reference"):
    """The kernel entry points have no autograd of their own (MMAdapterFunction is the op's
    one autograd path, checked by gradcheck above), so opcheck gets plain tensors."""
    tensors = make_adapter_inputs(2, 5, 16, 4, 2, 2, torch.float32, device="cpu")
    weights = None
    if routing == "explicit":
        weights = explicit_weights(2, 2, torch.float32, "cpu")
        tensors["router_weight"] = tensors["router_bias"] = None
    return (tensors["x"], tensors["down_weight"], tensors["down_bias"], tensors["up_weight"],
            tensors["up_bias"], tensors["router_weight"], tensors["router_bias"], weights,
            1.0, TEMPERATURE, 0.2, torch.tensor(9), 2, None, backend)


# the reference backend, and triton (its fake must know the shape of the slots it saves)
OP_BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON,
                                                                            reason="no triton"))]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("routing", ["router", "explicit"])
def test_opcheck_forward(routing, backend):
    torch.library.opcheck(torch.ops.mlan.mm_adapter.default, _op_args(routing, backend))


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("routing", ["router", "explicit"])
def test_opcheck_backward(routing, backend):
    args = _op_args(routing, backend)
    (x, down_weight, down_bias, up_weight, up_bias, router_weight, _, weights, scale,
     temperature, dropout_p, seed, groups, _, _) = args
    _, h, routing_weights, saved = torch.ops.mlan.mm_adapter(*args)
    grad_y = random_grad(x.shape, x.dtype, device="cpu")
    grad_routing = random_grad(routing_weights.shape, routing_weights.dtype, device="cpu")
    backward_args = (grad_y, grad_routing, x, h, routing_weights, saved, down_weight, down_bias,
                     up_weight, up_bias, router_weight, weights, scale, temperature, dropout_p,
                     seed, groups, False, backend)
    torch.library.opcheck(torch.ops.mlan.mm_adapter_backward.default, backward_args)
