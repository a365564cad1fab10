"""MMAdapter module: parameters, identity init, LaVIN checkpoint conversion, dropout RNG,
gradients, torch.compile and mixed precision (CPU, reference backend)."""
import pytest
import torch
from torch import nn

from mlan_kernels import MMAdapter
from mlan_kernels.modules import GroupedUpProjection


class LavinRepAdapterRouter(nn.Module):
    """Eager copy of LaVIN's `RepAdapter_Router` (lavin/mm_adapter.py) without autocast/.half()."""

    def __init__(self, in_features=768, hidden_dim=8, groups=2, scale=1.0, t=10.0):
        super().__init__()
        self.conv_A = nn.Conv1d(in_features, hidden_dim, 1, groups=1, bias=True)
        self.conv_B = nn.Conv1d(hidden_dim, in_features, 1, groups=groups, bias=True)
        self.conv_D = nn.Conv1d(hidden_dim, in_features, 1, groups=groups, bias=True)
        self.expert_weights = nn.Linear(in_features, 2)
        self.dropout = nn.Dropout(0.1)
        self.groups, self.scale, self.t = groups, scale, t

    def forward(self, x, weights=None):                      # x: [B, L, D]
        if weights is None:
            weights = torch.softmax(self.expert_weights(x[:, 0]) / self.t, -1)
        x = x.transpose(1, 2)
        x_ = self.dropout(self.conv_A(x))
        x = (self.conv_B(x_) * self.scale * weights[:, 0, None, None]
             + self.conv_D(x_) * self.scale * weights[:, 1, None, None] + x)
        return x.transpose(1, 2).contiguous()


def random_lavin(dim, rank, groups, scale=1.0, t=10.0, seed=0):
    """A LaVIN adapter in fp64 eval mode with every parameter random and non-zero."""
    torch.manual_seed(seed)
    lavin = LavinRepAdapterRouter(dim, rank, groups, scale, t).double().eval()
    with torch.no_grad():
        for parameter in lavin.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    return lavin


def random_adapter(dim=32, rank=8, experts=2, groups=2, dropout_p=0.1, dtype=torch.float32, seed=0):
    """An MMAdapter with random non-zero up-projections (so grads reach down/router)."""
    torch.manual_seed(seed)
    adapter = MMAdapter(dim, rank=rank, experts=experts, groups=groups, scale=0.7, temperature=2.0,
                        dropout_p=dropout_p, dtype=dtype)
    with torch.no_grad():
        adapter.up.weight.copy_(torch.randn_like(adapter.up.weight) * 0.3)
        adapter.up.bias.copy_(torch.randn_like(adapter.up.bias) * 0.3)
    return adapter


def test_parameter_names_shapes_and_init():
    adapter = MMAdapter(64, rank=8, experts=3, groups=2)
    shapes = {name: tuple(p.shape) for name, p in adapter.named_parameters()}
    assert shapes == {"down.weight": (8, 64), "down.bias": (8,), "up.weight": (3, 64, 4),
                      "up.bias": (3, 64), "router.weight": (3, 64), "router.bias": (3,)}
    assert isinstance(adapter.up, GroupedUpProjection)
    assert tuple(MMAdapter(48, rank=6, groups=1).up.weight.shape) == (2, 48, 6)   # dense g=1
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    assert torch.count_nonzero(adapter.down.bias) == 0
    bound = (6.0 / (64 + 8)) ** 0.5                                  # Xavier uniform bound
    assert adapter.down.weight.abs().max() <= bound and adapter.down.weight.abs().max() > bound / 2
    assert torch.count_nonzero(adapter.router.weight) == adapter.router.weight.numel()


def test_factory_kwargs():
    adapter = MMAdapter(16, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in adapter.parameters()} == {torch.float64}


@pytest.mark.parametrize("training", [False, True])
def test_identity_at_init(training):
    adapter = MMAdapter(64, rank=8, groups=2, dropout_p=0.5).train(training)
    x = torch.randn(3, 7, 64)
    assert torch.equal(adapter(x), x)


def test_extra_repr():
    text = repr(MMAdapter(96, rank=4, experts=3, groups=4, scale=0.5, temperature=5.0, dropout_p=0.2))
    for part in ("dim=96", "rank=4", "experts=3", "groups=4", "scale=0.5", "temperature=5.0",
                 "dropout_p=0.2"):
        assert part in text


@pytest.mark.parametrize("kwargs, argument", [
    (dict(dim=64, rank=6, groups=4), "groups"),          # rank % groups
    (dict(dim=66, rank=8, groups=4), "groups"),          # dim % groups
    (dict(dim=64, experts=0), "experts"),
    (dict(dim=64, temperature=0.0), "temperature"),
    (dict(dim=64, temperature=-1.0), "temperature"),
    (dict(dim=64, dropout_p=1.0), "dropout_p"),
    (dict(dim=64, dropout_p=-0.1), "dropout_p"),
    (dict(dim=0), "dim"),
])
def test_constructor_errors_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        MMAdapter(**kwargs)


@pytest.mark.parametrize("dim", [64, 96])
@pytest.mark.parametrize("groups", [1, 2])
def test_from_lavin_matches_lavin_module(dim, groups):
    lavin = random_lavin(dim, 8, groups, scale=0.8, t=5.0)
    adapter = MMAdapter.from_lavin_state_dict(lavin.state_dict(), temperature=5.0, scale=0.8).eval()
    assert (adapter.dim, adapter.rank, adapter.groups, adapter.experts) == (dim, 8, groups, 2)
    x = torch.randn(3, 5, dim, dtype=torch.float64)
    with torch.no_grad():
        routed = lavin(x)
        assert (routed - x).abs().max() > 1e-2                      # the check is not vacuous
        torch.testing.assert_close(adapter(x), routed, atol=1e-12, rtol=0)
        weights = torch.softmax(torch.randn(3, 2, dtype=torch.float64), -1)
        torch.testing.assert_close(adapter(x, weights=weights), lavin(x, weights), atol=1e-12, rtol=0)
        router = torch.softmax(lavin.expert_weights(x[:, 0]) / 5.0, -1)
        torch.testing.assert_close(adapter.routing_weights(x), router, atol=1e-14, rtol=0)


@pytest.mark.parametrize("groups", [1, 2])
def test_lavin_round_trip_is_bit_exact(groups):
    state = random_lavin(64, 8, groups).state_dict()
    prefixed = {f"layers.3.adapter_mlp.{key}": value for key, value in state.items()}
    adapter = MMAdapter.from_lavin_state_dict(prefixed, prefix="layers.3.adapter_mlp.")
    back = adapter.to_lavin_state_dict(prefix="layers.3.adapter_mlp.")
    assert list(back) == list(prefixed)
    for key, value in prefixed.items():
        assert back[key].dtype == value.dtype and back[key].device == value.device
        assert torch.equal(back[key], value), key
    assert back["layers.3.adapter_mlp.conv_A.weight"].data_ptr() != adapter.down.weight.data_ptr()


def test_from_lavin_preserves_dtypes_and_copies():
    state = {k: v.float() for k, v in random_lavin(32, 8, 2).state_dict().items()}
    state["expert_weights.weight"] = state["expert_weights.weight"].half()
    adapter = MMAdapter.from_lavin_state_dict(state)
    assert adapter.down.weight.dtype == torch.float32 and adapter.router.weight.dtype == torch.float16
    assert all(p.requires_grad and p.device.type == "cpu" for p in adapter.parameters())
    with torch.no_grad():
        adapter.down.weight.zero_()
    assert torch.count_nonzero(state["conv_A.weight"]) > 0               # input left untouched


@pytest.mark.parametrize("groups", [1, 2])
def test_converted_adapter_loads_into_lavin_module(groups):
    adapter = random_adapter(dim=64, rank=8, groups=groups, dtype=torch.float64)
    lavin = LavinRepAdapterRouter(64, 8, groups, scale=adapter.scale, t=adapter.temperature)
    lavin = lavin.double().eval()
    lavin.load_state_dict(adapter.to_lavin_state_dict(), strict=True)
    x = torch.randn(2, 6, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(adapter.eval()(x), lavin(x), atol=1e-12, rtol=0)


def test_to_lavin_rejects_other_expert_counts():
    with pytest.raises(ValueError, match="experts"):
        MMAdapter(32, experts=3).to_lavin_state_dict()


def test_from_lavin_names_missing_and_malformed_keys():
    state = random_lavin(32, 8, 2).state_dict()
    del state["conv_D.bias"]
    with pytest.raises(KeyError, match=r"adapter\.conv_D\.bias"):
        MMAdapter.from_lavin_state_dict({f"adapter.{k}": v for k, v in state.items()},
                                        prefix="adapter.")
    state = random_lavin(32, 8, 2).state_dict()
    state["conv_D.weight"] = state["conv_D.weight"][:, :2]
    with pytest.raises(ValueError, match=r"conv_D\.weight"):
        MMAdapter.from_lavin_state_dict(state)


def _train_step(adapter, x, seed):
    torch.manual_seed(seed)
    adapter.zero_grad()
    x = x.clone().requires_grad_()
    y = adapter(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in adapter.parameters()]


def test_dropout_follows_torch_manual_seed():
    adapter = random_adapter(dropout_p=0.3).train()
    x = torch.randn(2, 9, 32)
    y1, gx1, grads1 = _train_step(adapter, x, seed=1)
    y2, gx2, grads2 = _train_step(adapter, x, seed=1)
    y3, _, _ = _train_step(adapter, x, seed=2)
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))
    assert not torch.equal(y1, y3)
    with torch.no_grad():
        assert not torch.allclose(y1, adapter.eval()(x))               # dropout was active


def test_eval_output_does_not_depend_on_rng():
    adapter = random_adapter(dropout_p=0.3).eval()
    x = torch.randn(2, 9, 32)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    y1 = adapter(x)
    assert torch.equal(torch.get_rng_state(), state)                   # no seed drawn
    torch.manual_seed(2)
    assert torch.equal(adapter(x), y1)


def test_gradients_reach_all_parameters():
    adapter = random_adapter(dropout_p=0.2).train()
    _, grad_x, grads = _train_step(adapter, torch.randn(3, 5, 32), seed=0)
    names = [name for name, _ in adapter.named_parameters()]
    assert len(grads) == 6
    for name, grad in zip(names, grads):
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name
    assert grad_x.abs().max() > 0


def test_gradients_match_lavin_module():
    lavin = random_lavin(32, 8, 2, t=3.0)
    adapter = MMAdapter.from_lavin_state_dict(lavin.state_dict(), temperature=3.0).eval()
    x = torch.randn(2, 4, 32, dtype=torch.float64)
    probe = torch.randn(2, 4, 32, dtype=torch.float64)
    (adapter(x) * probe).sum().backward()
    (lavin(x) * probe).sum().backward()
    theirs = {k: p.grad for k, p in lavin.named_parameters()}
    grads = {"conv_A.weight": adapter.down.weight.grad[..., None], "conv_A.bias": adapter.down.bias.grad,
             "conv_B.weight": adapter.up.weight.grad[0][..., None], "conv_B.bias": adapter.up.bias.grad[0],
             "conv_D.weight": adapter.up.weight.grad[1][..., None], "conv_D.bias": adapter.up.bias.grad[1],
             "expert_weights.weight": adapter.router.weight.grad,
             "expert_weights.bias": adapter.router.bias.grad}
    for key, grad in grads.items():
        torch.testing.assert_close(grad, theirs[key], atol=1e-12, rtol=0, msg=key)


def test_torch_compile_fullgraph_eval_and_train():
    torch._dynamo.reset()
    adapter = random_adapter(dropout_p=0.25)
    compiled = torch.compile(adapter, fullgraph=True)
    x = torch.randn(2, 6, 32)
    adapter.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), adapter(x), atol=1e-6, rtol=1e-5)
    adapter.train()
    torch.manual_seed(3)
    y = compiled(x)
    torch.manual_seed(3)
    assert torch.equal(compiled(x), y)                                 # seed follows torch RNG
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert adapter.down.weight.grad is not None and adapter.down.weight.grad.abs().max() > 0
    with torch.no_grad():
        assert not torch.allclose(y, adapter.eval()(x))                # dropout applied
    torch._dynamo.reset()


def test_fp32_parameters_with_bf16_activations():
    adapter = random_adapter(dropout_p=0.0).eval()
    x = torch.randn(2, 8, 32).bfloat16()
    y = adapter(x, backend="reference")
    assert y.dtype == torch.bfloat16 and adapter.down.weight.dtype == torch.float32
    with torch.no_grad():
        expected = adapter(x.float(), backend="reference")
    assert (expected - x.float()).abs().max() > 0.1                     # adapter does something
    torch.testing.assert_close(y.float(), expected, atol=3e-2, rtol=1e-2)
    y.float().sum().backward()
    assert {p.grad.dtype for p in adapter.parameters()} == {torch.float32}
