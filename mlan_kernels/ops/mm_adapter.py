"""The `mlan::mm_adapter` op: one schema, fake (meta) kernels, backend dispatch, one autograd path.

    torch.ops.mlan.mm_adapter(x, down_weight, down_bias, up_weight, up_bias, router_weight,
                              router_bias, weights, scale, temperature, dropout_p, seed, groups,
                              single_modality, backend) -> (y, h, routing_weights, saved)
    torch.ops.mlan.mm_adapter_backward(grad_y, grad_routing_weights, x, h, routing_weights, saved,
                              down_weight, down_bias, up_weight, up_bias, router_weight, weights,
                              scale, temperature, dropout_p, seed, groups, routes_by_first,
                              backend) -> (grad_x, grad_down_weight, grad_down_bias,
                                           grad_up_weight, grad_up_bias, routing_grads)

x [B, L, D] is routed per sample by x[:, 0]. A backend with the routed pair (triton: see
mlan_kernels.dispatch) runs the router and its backward inside its own kernels and keeps what
its backward needs in `saved`; for the others both run here in fp32 and `saved` is empty.
routing_grads: [∂router_weight, ∂router_bias], or [∂weights] when `weights` replaced the router.
seed: an int64 scalar tensor on x's device (or None without dropout); nothing here reads it on
the host, so the triton path is CUDA-graph capturable.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from ..functional import compute_dtype
from ..functional import routing_weights as _router_softmax
from .validation import check_seed, validate_mm_adapter_args


def _backend(x: Tensor, backend: str):
    """The module of the backend that runs x (None for an empty x: nothing to launch)."""
    return dispatch.get_backend(dispatch.select_backend(x.device, x.dtype, backend)) if x.numel() else None


def _routing(x, router_weight, router_bias, weights, temperature, experts, by_first):
    """Routing weights [B, E] in the compute dtype: `weights` when given, else the router on
    x[:, 0] (uniform without a routing token); by_first: row 0's for every row."""
    batch, length, _ = x.shape
    rows = 1 if by_first else batch
    if weights is not None:
        routing = weights[:rows].to(compute_dtype(x.dtype)).clone()
    elif length == 0:
        routing = x.new_full((rows, experts), 1.0 / experts, dtype=compute_dtype(x.dtype))
    else:
        routing = _router_softmax(x[:rows, 0], router_weight, router_bias, temperature)
    return routing.expand(batch, experts).contiguous() if by_first else routing


def _routes_by_first(single_modality: Optional[bool], batch: int) -> bool:
    """single_modality=True means: every sample of the batch is routed by sample 0 (its router
    output on x[0, 0], or weights[0]). The promise is not checked (no device sync); when
    samples do differ, every backend computes exactly this, and gradients follow it (the
    router and x[0, 0], or weights[0], receive the whole batch's routing gradient)."""
    return single_modality is True and batch > 1


def _is_single_modality(x: Tensor, weights: Optional[Tensor], single_modality: Optional[bool],
                        detect: bool) -> bool:
    """Whether to use the single-modality fast path (one combined up-matrix for the batch).

    True is the caller's promise (MLAN batches are single-modality by construction): sample
    0's weights are used for all (see _routes_by_first); False always takes the general
    per-sample path. None keeps per-sample routing, so either path is correct for it and the
    fast one is only an optimisation: with `detect` (CPU tensors on a backend without the
    routed pair, where reading is no device sync) it is taken when every sample has the same
    routing input — the explicit `weights` rows, else the routing tokens x[:, 0]; the inputs
    are compared, not the softmax outputs, as a GEMM may round equal rows differently by their
    position (seen with MKL on AVX-512). Without `detect` (the Triton backend on any device,
    every backend on GPU tensors) None is the general path: comparing would be a device sync
    (docs/architecture.md, "single_modality=None on device paths", gives the cost).
    """
    if x.shape[0] <= 1 or single_modality is not None:
        return x.shape[0] <= 1 or bool(single_modality)
    if not detect:
        return False
    source = weights if weights is not None else x[:, 0]
    return bool((source == source[:1]).all())


def _forward_impl(x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias,
                  weights, scale, temperature, dropout_p, seed, groups, single_modality, backend):
    """Routing (fp32, per sample) + the chosen backend's fused forward -> (y, h, routing_weights, saved)."""
    module = _backend(x, backend)
    by_first = _routes_by_first(single_modality, x.shape[0])
    if hasattr(module, "forward_routed"):
        return module.forward_routed(
            x.contiguous(), down_weight, down_bias, up_weight, up_bias, router_weight, router_bias,
            weights, scale, temperature, dropout_p, seed, groups,
            _is_single_modality(x, weights, single_modality, detect=False), by_first)
    rw = _routing(x, router_weight, router_bias, weights, temperature, up_weight.shape[0], by_first)
    saved = x.new_empty(0)
    if module is None:
        h = x.new_zeros(*x.shape[:2], down_weight.shape[0], dtype=compute_dtype(x.dtype))
        return x.clone(), h, rw, saved
    y, h = module.forward(x.contiguous(), down_weight, down_bias, up_weight, up_bias, rw, scale,
                          dropout_p, seed, groups,
                          _is_single_modality(x, weights, single_modality, x.device.type == "cpu"))
    return y, h, rw, saved


@torch.library.custom_op("mlan::mm_adapter", mutates_args=())
def mm_adapter_op(x: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor,
                  up_bias: Tensor, router_weight: Optional[Tensor], router_bias: Optional[Tensor],
                  weights: Optional[Tensor], scale: float, temperature: float, dropout_p: float,
                  seed: Optional[Tensor], groups: int, single_modality: Optional[bool] = None,
                  backend: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias,
                         weights, scale, temperature, dropout_p, seed, groups, single_modality,
                         backend)


@mm_adapter_op.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias, weights, scale,
      temperature, dropout_p, seed, groups, single_modality=None, backend="auto"):
    batch, length, dim = x.shape
    compute = compute_dtype(x.dtype)
    h = x.new_empty(batch, length, down_weight.shape[0], dtype=compute)
    slots_shape = getattr(_backend(x, backend), "saved_slots_shape", None)
    saved = x.new_empty(slots_shape(dim, down_weight.shape[0], up_weight.shape[0], x.dtype)
                        if slots_shape else (0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), h, \
        x.new_empty(batch, up_weight.shape[0], dtype=compute), saved


def _routing_backward(grad_w, rw, x, router_weight, weights, temperature, by_first, grad_x):
    """The routing gradients from ∂w [B, E] (fp32): [∂weights] in weights' dtype, or the softmax
    + router backward [∂W_R, ∂b_R] (router_weight's dtype) with dz W_R added into grad_x[:, 0]:
        dz = w ⊙ (∂w − <w, ∂w>) / t ;  ∂W_R = dzᵀ x0 ;  ∂b_R = Σ_b dz ;  ∂x[:, 0] += dz W_R."""
    if by_first:                                # every row was row 0: its gradient is the sum
        grad_w = grad_w.sum(0, keepdim=True)    # rows 1.. get zero (weights) / nothing (router)
    if weights is not None:
        if by_first:
            grad_w = torch.cat([grad_w, grad_w.new_zeros(x.shape[0] - 1, grad_w.shape[1])])
        return [grad_w.to(weights.dtype)]
    if x.shape[1] == 0:                         # no routing token: the weights were a constant 1/E
        return [torch.zeros_like(router_weight), router_weight.new_zeros(router_weight.shape[0])]
    routed = grad_w.shape[0]                    # by_first: only row 0 routed (rows [:1])
    rw = rw[:routed]
    # (softmax's own backward kernel: one launch for w ⊙ (dw − <w, dw>), not four)
    grad_logits = torch._softmax_backward_data(grad_w, rw, -1, rw.dtype) / temperature  # [B, E]
    x0 = x[:routed, 0].to(rw.dtype)
    grad_x[:routed, 0].add_((grad_logits @ router_weight.to(rw.dtype)).to(grad_x.dtype))  # [B, D]
    return [(grad_logits.t() @ x0).to(router_weight.dtype),
            grad_logits.sum(0).to(router_weight.dtype)]


def _backward_impl(grad_y, grad_routing_weights, x, h, routing_weights, saved, down_weight,
                   down_bias, up_weight, up_bias, router_weight, weights, scale, temperature,
                   dropout_p, seed, groups, routes_by_first, backend):
    """Every gradient, from the chosen backend (see mm_adapter_backward_op)."""
    module = _backend(x, backend)
    if hasattr(module, "backward_routed"):
        *grads, routing_grads = module.backward_routed(
            grad_y.contiguous(), grad_routing_weights, x.contiguous(), h, routing_weights, saved,
            down_weight, down_bias, up_weight, up_bias, router_weight, weights, scale, temperature,
            dropout_p, seed, groups, routes_by_first)
        return (*grads, list(routing_grads))
    if module is None:
        grads = [torch.zeros_like(x), torch.zeros_like(down_weight), torch.zeros_like(down_bias),
                 torch.zeros_like(up_weight), torch.zeros_like(up_bias)]
        grad_w = torch.zeros_like(routing_weights)
    else:
        *grads, grad_w = module.backward(
            grad_y.contiguous(), x.contiguous(), h, routing_weights, down_weight, down_bias,
            up_weight, up_bias, scale, dropout_p, seed, groups)
    if grad_routing_weights is not None:
        grad_w = grad_w + grad_routing_weights
    return (*grads, _routing_backward(grad_w, routing_weights, x, router_weight, weights,
                                      temperature, routes_by_first, grads[0]))


@torch.library.custom_op("mlan::mm_adapter_backward", mutates_args=())
def mm_adapter_backward_op(grad_y: Tensor, grad_routing_weights: Optional[Tensor], x: Tensor,
                           h: Tensor, routing_weights: Tensor, saved: Tensor, down_weight: Tensor,
                           down_bias: Tensor, up_weight: Tensor, up_bias: Tensor,
                           router_weight: Optional[Tensor], weights: Optional[Tensor],
                           scale: float, temperature: float, dropout_p: float,
                           seed: Optional[Tensor], groups: int, routes_by_first: bool,
                           backend: str = "auto"
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """(grad_x, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias, routing_grads),
    each in its input's dtype; router_weight None when `weights` (then not None) routed."""
    return _backward_impl(grad_y, grad_routing_weights, x, h, routing_weights, saved, down_weight,
                          down_bias, up_weight, up_bias, router_weight, weights, scale,
                          temperature, dropout_p, seed, groups, routes_by_first, backend)


@mm_adapter_backward_op.register_fake
def _(grad_y, grad_routing_weights, x, h, routing_weights, saved, down_weight, down_bias,
      up_weight, up_bias, router_weight, weights, scale, temperature, dropout_p, seed, groups,
      routes_by_first, backend="auto"):
    routing_grads = ([torch.empty_like(weights)] if weights is not None else
                     [torch.empty_like(router_weight), router_weight.new_empty(router_weight.shape[0])])
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(down_weight),
            torch.empty_like(down_bias), torch.empty_like(up_weight), torch.empty_like(up_bias),
            routing_grads)


class MMAdapterFunction(torch.autograd.Function):
    """The op's one autograd path, eager and under torch.compile (which traces this Function and
    sees the two custom ops as opaque nodes with fakes).

    Forward (mlan::mm_adapter): w = router(x[:, 0]) or `weights`; H = dropout(x W_Aᵀ + b_A);
        y = x + s Σ_e w_{b,e} (H M_eᵀ + b_U[e]).
    Backward (mlan::mm_adapter_backward): the token-wise gradients
        ∂H = s Σ_e w_e (∂y M_e) (then the dropout mask), ∂x = ∂y + ∂H W_A, ∂W_A = ∂Hᵀ x,
        ∂b_A = Σ ∂H, ∂M_e = s w_e ∂yᵀ H, ∂b_U[e] = s w_e Σ_l ∂y, ∂w_e = s <∂y, H M_eᵀ + b_U[e]>;
    then, in fp32, the softmax + router backward
        dz = w ⊙ (∂w − <w, ∂w>) / t ;  ∂W_R = dzᵀ x0 ;  ∂b_R = Σ_b dz ;  ∂x[:, 0] += dz W_R.
    """

    @staticmethod
    def forward(ctx, x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias,
                weights, scale, temperature, dropout_p, seed, groups, single_modality, backend):
        y, h, rw, saved = torch.ops.mlan.mm_adapter.default(
            x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias, weights,
            scale, temperature, dropout_p, seed, groups, single_modality, backend)
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)    # unused outputs (h, rw) get None, not zero-filled tensors
        ctx.save_for_backward(x, down_weight, down_bias, up_weight, up_bias,
                              router_weight if weights is None else None, weights, h, rw, saved, seed)
        ctx.hyper = (scale, temperature, dropout_p, groups, backend)
        ctx.by_first = _routes_by_first(single_modality, x.shape[0])
        return y, h, rw

    @staticmethod
    def backward(ctx, grad_y, _grad_h, grad_rw):
        x, down_weight, down_bias, up_weight, up_bias, router_weight, weights, h, rw, saved, seed = \
            ctx.saved_tensors
        scale, temperature, dropout_p, groups, backend = ctx.hyper
        grad_y = torch.zeros_like(x) if grad_y is None else grad_y
        *token_grads, routing_grads = torch.ops.mlan.mm_adapter_backward.default(
            grad_y, grad_rw, x, h, rw, saved, down_weight, down_bias, up_weight, up_bias,
            router_weight, weights, scale, temperature, dropout_p, seed, groups, ctx.by_first,
            backend)
        routing = ((None, None, routing_grads[0]) if weights is not None
                   else (routing_grads[0], routing_grads[1], None))
        return (*token_grads, *routing) + (None,) * 7   # scale .. backend are not differentiable


def new_dropout_seed(device=None) -> Tensor:
    """A fresh dropout seed [] int64 on `device`, drawn from torch's generator of that device
    (follows torch.manual_seed; on CUDA a device op, so CUDA-graph capturable)."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)


def mm_adapter(x, down_weight, down_bias, up_weight, up_bias, router_weight=None, router_bias=None,
               weights=None, *, scale=1.0, temperature=10.0, dropout_p=0.0, seed=None, groups=1,
               single_modality=None, backend="auto", return_routing_weights=False):
    """Fused MM-Adapter: y = x + s Σ_e w_{b,e} (dropout(x W_Aᵀ + b_A) M_eᵀ + b_U[e]).

    x: [B, L, D] (fp32/fp16/bf16; fp64 on the reference backend); down_weight [r, D];
    down_bias [r]; up_weight [E, D, r/groups]; up_bias [E, D]; router_weight [E, D];
    router_bias [E]; weights: optional [B, E] routing weights replacing the router.
    seed: int or int64 tensor for the dropout mask, moved to x's device (an int costs a host
    to device copy: pass a device tensor, or None, to capture in a CUDA graph). None with
    dropout_p > 0 draws one on x's device from torch's generator (new_dropout_seed); under
    torch.compile the draw comes from the compiled RNG, so masks differ from eager ones for
    the same torch.manual_seed, while staying reproducible.
    single_modality: None = route per sample, taking the fast path when the routing inputs are
    equal on the host only (CPU tensors, cpu/reference backends; never a device sync: the
    Triton path and GPU tensors run the general path); True = route every sample by sample 0
    (the caller's single-modality promise, not checked; the fast path everywhere); False =
    never. Anything else raises TypeError.
    backend: "auto" | "reference" | "triton" | "cuda" | "cpu".
    Returns y [B, L, D] in x.dtype (and the [B, E] fp32 routing weights if asked).
    """
    validate_mm_adapter_args(x, down_weight, down_bias, up_weight, up_bias, router_weight,
                             router_bias, weights, scale, temperature, dropout_p, groups,
                             single_modality)
    check_seed(seed)
    if dropout_p == 0:
        seed = None
    elif seed is None:
        seed = new_dropout_seed(x.device)
    elif not isinstance(seed, Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64, device=x.device)
    else:
        seed = seed.to(device=x.device, dtype=torch.int64).reshape(())
    y, _, rw = MMAdapterFunction.apply(
        x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias, weights,
        float(scale), float(temperature), float(dropout_p), seed, groups, single_modality, backend)
    return (y, rw) if return_routing_weights else y
