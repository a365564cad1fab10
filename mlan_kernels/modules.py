"""`MMAdapter`: the nn.Module that holds the MM-Adapter parameters and calls the fused op.

Parameters (names as in docs/mm_adapter.md; D = dim, r = rank, E = experts, g = groups):
    down.weight   [r, D]       W_A, Xavier uniform       down.bias   [r]     b_A, 0
    up.weight     [E, D, r/g]  grouped W_U, 0            up.bias     [E, D]  b_U, 0
    router.weight [E, D]       W_R, nn.Linear init       router.bias [E]     b_R, nn.Linear init
The zero up-projection makes a fresh adapter an exact identity. No math lives here: the
forward is `mlan_kernels.ops.mm_adapter.mm_adapter`, and LaVIN's `RepAdapter_Router`
checkpoints convert with `from_lavin_state_dict` / `to_lavin_state_dict`.
"""
import dataclasses

import torch
from torch import Tensor, nn

from .config import AdapterConfig
from .ops.mm_adapter import mm_adapter
from .functional import routing_weights as _router_softmax

# LaVIN's RepAdapter_Router: conv_A is the down-projection, conv_B / conv_D the up-projections
# of expert 0 / expert 1 (Conv1d kernel size 1, so each weight has a trailing dimension of 1),
# expert_weights the router.
LAVIN_KEYS = ("conv_A.weight", "conv_A.bias", "conv_B.weight", "conv_B.bias",
              "conv_D.weight", "conv_D.bias", "expert_weights.weight", "expert_weights.bias")
LAVIN_UP_CONVS = ("conv_B", "conv_D")


class GroupedUpProjection(nn.Module):
    """Holds the E experts' grouped up-projections: weight [E, D, r/g], bias [E, D] (both zero).

    Expert e's output channel j reads hidden block j // (D/g), as a grouped 1x1 Conv1d(r, D,
    groups=g) would; the op applies it, so this module has no forward of its own.
    """

    def __init__(self, dim, rank, experts, groups, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(experts, dim, rank // groups, **factory))
        self.bias = nn.Parameter(torch.zeros(experts, dim, **factory))

    def reset_parameters(self):
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self):
        experts, dim, rank_per_group = self.weight.shape
        return f"experts={experts}, dim={dim}, rank={rank_per_group * self.groups}, groups={self.groups}"


class MMAdapter(nn.Module):
    """Mixture-of-Modality adapter (LaVIN): y = x + s Σ_e w_{b,e} (dropout(x W_Aᵀ + b_A) M_eᵀ + b_U[e]).

    dim: hidden size D. config: an AdapterConfig (rank r, experts E, groups g, scale s,
    temperature t of the router softmax, dropout_p on the hidden H in training mode only;
    see mlan_kernels/config.py), or its fields as keywords: MMAdapter(4096, rank=8).
    Parameters are created with `device` / `dtype` (fp32 parameters with bf16/fp16
    activations are supported, as in LaVIN's fp32 master weights under autocast).
    routing_dtype (attribute): None, or torch.float16 when config.compat == "lavin": the
    router's weights are rounded through that dtype, as LaVIN's `.half()` does
    (lavin/mm_adapter.py line 46); the gradient passes through the rounding unchanged.
    """

    def __init__(self, dim, config: AdapterConfig = None, *, device=None, dtype=None, **settings):
        super().__init__()
        config = AdapterConfig.resolve(config, **settings)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dim % config.groups != 0:
            raise ValueError(f"groups {config.groups} must divide dim {dim}")
        self.dim, self.config = dim, config
        self.routing_dtype = torch.float16 if config.compat == "lavin" else None
        factory = {"device": device, "dtype": dtype}
        self.down = nn.Linear(dim, config.rank, **factory)
        self.up = GroupedUpProjection(dim, config.rank, config.experts, config.groups, **factory)
        self.router = nn.Linear(dim, config.experts, **factory)
        self.reset_parameters()

    # The settings, read from the config (one source; a new config means a new adapter).
    rank = property(lambda self: self.config.rank)
    experts = property(lambda self: self.config.experts)
    groups = property(lambda self: self.config.groups)
    scale = property(lambda self: float(self.config.scale))
    temperature = property(lambda self: float(self.config.temperature))
    dropout_p = property(lambda self: float(self.config.dropout_p))

    def reset_parameters(self):
        """LaVIN's init: Xavier-uniform W_A, zero b_A / W_U / b_U, nn.Linear's default router."""
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.up.reset_parameters()
        self.router.reset_parameters()

    def forward(self, x: Tensor, weights: Tensor = None, single_modality=None,
                backend: str = "auto") -> Tensor:
        """x: [B, L, D] -> y [B, L, D] in x.dtype, sample b routed by x[b, 0].

        weights: optional [B, E] routing weights that replace the router. single_modality and
        backend are passed to `mm_adapter` (None: per sample, no device sync; True: sample 0
        routes all, the combined-U fast path; False: per sample).
        In training mode the dropout seed is drawn from torch's RNG (follows torch.manual_seed).
        """
        if weights is None and self.routing_dtype is not None:
            weights = self.routing_weights(x)
        return mm_adapter(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                          self.router.weight, self.router.bias, weights, scale=self.scale,
                          temperature=self.temperature,
                          dropout_p=self.dropout_p if self.training else 0.0, seed=None,
                          groups=self.groups, single_modality=single_modality, backend=backend)

    def routing_weights(self, x: Tensor) -> Tensor:
        """x: [B, L, D] -> the router's [B, E] softmax weights on x[:, 0] (fp32; fp64 for fp64 x).

        Differentiable (for auxiliary routing losses); wrap in torch.no_grad() to only inspect.
        Rounded through routing_dtype when that is set.
        """
        weights = _router_softmax(x[:, 0], self.router.weight, self.router.bias, self.temperature)
        if self.routing_dtype is None:
            return weights
        return weights.to(self.routing_dtype).to(weights.dtype)

    def extra_repr(self):
        return (f"dim={self.dim}, rank={self.rank}, experts={self.experts}, groups={self.groups}, "
                f"scale={self.scale}, temperature={self.temperature}, dropout_p={self.dropout_p}"
                + (f", compat={self.config.compat!r}" if self.config.compat else ""))

    @classmethod
    def from_lavin_state_dict(cls, state_dict, config: AdapterConfig = None, prefix="", **settings):
        """Build an MMAdapter from a LaVIN `RepAdapter_Router` state dict (keys under `prefix`).

        config (or its fields as keywords) gives scale, temperature, dropout_p and compat; rank,
        experts (2) and groups are read from the shapes and replace the config's.
        conv_A.weight [r, D, 1], conv_A.bias [r]; conv_B / conv_D (experts 0 / 1) weight
        [D, r/g, 1], bias [D]; expert_weights.weight [2, D], expert_weights.bias [2].
        D, r and g are read from the shapes; tensors keep their dtype and device (copied).
        """
        missing = [prefix + key for key in LAVIN_KEYS if prefix + key not in state_dict]
        if missing:
            raise KeyError(f"state_dict is missing LaVIN RepAdapter_Router keys: {missing}")
        lavin = {key: state_dict[prefix + key].detach() for key in LAVIN_KEYS}
        if lavin["conv_A.weight"].dim() != 3:
            raise ValueError(f"{prefix}conv_A.weight must be [r, D, 1], "
                             f"got shape {list(lavin['conv_A.weight'].shape)}")
        rank, dim = lavin["conv_A.weight"].shape[:2]
        _expect_shape(lavin, "conv_A.weight", (rank, dim, 1), prefix)
        _expect_shape(lavin, "conv_A.bias", (rank,), prefix)
        rank_per_group = lavin["conv_B.weight"].shape[1] if lavin["conv_B.weight"].dim() == 3 else 0
        if rank_per_group < 1 or rank % rank_per_group != 0:
            raise ValueError(f"{prefix}conv_B.weight must be [D, r/g, 1] with r/g dividing r={rank}, "
                             f"got shape {list(lavin['conv_B.weight'].shape)}")
        for conv in LAVIN_UP_CONVS:
            _expect_shape(lavin, f"{conv}.weight", (dim, rank_per_group, 1), prefix)
            _expect_shape(lavin, f"{conv}.bias", (dim,), prefix)
        _expect_shape(lavin, "expert_weights.weight", (2, dim), prefix)
        _expect_shape(lavin, "expert_weights.bias", (2,), prefix)

        ours = {
            "down.weight": lavin["conv_A.weight"][..., 0].clone(),
            "down.bias": lavin["conv_A.bias"].clone(),
            "up.weight": torch.stack([lavin[f"{conv}.weight"][..., 0] for conv in LAVIN_UP_CONVS]),
            "up.bias": torch.stack([lavin[f"{conv}.bias"] for conv in LAVIN_UP_CONVS]),
            "router.weight": lavin["expert_weights.weight"].clone(),
            "router.bias": lavin["expert_weights.bias"].clone(),
        }
        config = dataclasses.replace(AdapterConfig.resolve(config, **settings), rank=rank,
                                     experts=2, groups=rank // rank_per_group)
        module = cls(dim, config, device="meta")
        module.load_state_dict(ours, strict=True, assign=True)   # keeps each tensor's dtype/device
        return module

    def to_lavin_state_dict(self, prefix=""):
        """This adapter in LaVIN's `RepAdapter_Router` layout (see from_lavin_state_dict); copies."""
        if self.experts != 2:
            raise ValueError(f"LaVIN's RepAdapter_Router has exactly 2 experts; this adapter has "
                             f"experts={self.experts}")
        up_weight, up_bias = self.up.weight.detach(), self.up.bias.detach()
        lavin = {"conv_A.weight": self.down.weight.detach()[..., None],
                 "conv_A.bias": self.down.bias.detach()}
        for expert, conv in enumerate(LAVIN_UP_CONVS):
            lavin[f"{conv}.weight"] = up_weight[expert][..., None]
            lavin[f"{conv}.bias"] = up_bias[expert]
        lavin["expert_weights.weight"] = self.router.weight.detach()
        lavin["expert_weights.bias"] = self.router.bias.detach()
        return {prefix + key: value.clone() for key, value in lavin.items()}


def _expect_shape(lavin, key, expected, prefix):
    if tuple(lavin[key].shape) != tuple(expected):
        raise ValueError(f"{prefix}{key} must have shape {list(expected)}, got {list(lavin[key].shape)}")
