"""The `mlan::mm_adapter` op: one schema, fake (meta) kernels, backend dispatch, one autograd path.

    torch.ops.mlan.mm_adapter(x, down_weight, down_bias, up_weight, up_bias, router_weight,
                              router_bias, weights, scale, temperature, dropout_p, seed, groups,
                              single_modality, backend) -> (y, h, routing_weights)

x [B, L, D] is routed per sample by x[:, 0]. The router (a [B, E] softmax) and its backward
run here in fp32 for every backend; the backends do the fused token-wise work.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from ..functional import compute_dtype
from ..functional import routing_weights as _router_softmax
from .validation import validate_mm_adapter_args


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed)


def _routing(x, router_weight, router_bias, weights, temperature, experts, router=None):
    """Routing weights [B, E] in the compute dtype: given `weights`, or the router on x[:, 0]
    (`router`: a backend's own fused router, same math as functional.routing_weights)."""
    batch, length, _ = x.shape
    if weights is not None:
        return weights.to(compute_dtype(x.dtype)).clone()
    if length == 0:
        return x.new_full((batch, experts), 1.0 / experts, dtype=compute_dtype(x.dtype))
    return (router or _router_softmax)(x[:, 0], router_weight, router_bias, temperature)


def _routes_by_first(single_modality: Optional[bool], batch: int) -> bool:
    """single_modality=True means: every sample of the batch is routed by sample 0 (its router
    output on x[0, 0], or weights[0]). The promise is not checked (no device sync); when
    samples do differ, every backend computes exactly this, and gradients follow it (the
    router and x[0, 0], or weights[0], receive the whole batch's routing gradient)."""
    return single_modality is True and batch > 1


def _is_single_modality(x: Tensor, weights: Optional[Tensor], single_modality: Optional[bool]) -> bool:
    """Whether to use the single-modality fast path (one combined up-matrix for the batch).

    None detects it: every sample has the same routing input — the explicit `weights` rows, else
    the routing tokens x[:, 0] (one device sync on GPU). The inputs are compared, not the
    softmax outputs: a GEMM may round equal rows differently by their position (seen with MKL
    on AVX-512). True is the caller's promise (MLAN batches are single-modality by
    construction): sample 0's weights are used for all (see _routes_by_first); False always
    takes the general per-sample path.
    """
    if x.shape[0] <= 1 or single_modality is not None:
        return x.shape[0] <= 1 or bool(single_modality)
    source = weights if weights is not None else x[:, 0]
    return bool((source == source[:1]).all())


def _forward_impl(x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias,
                  weights, scale, temperature, dropout_p, seed, groups, single_modality, backend):
    """Routing (fp32, per sample) + the chosen backend's fused forward -> (y, h, routing_weights)."""
    experts = up_weight.shape[0]
    name = dispatch.select_backend(x.device, x.dtype, backend) if x.numel() else None
    router = getattr(dispatch.get_backend(name), "routing", None) if name else None
    if _routes_by_first(single_modality, x.shape[0]) and router and weights is None and x.shape[1]:
        # the backend's router writes sample 0's routing weights to every row (stride-0 input)
        rw = router(x[:1, 0].expand(x.shape[0], x.shape[2]), router_weight, router_bias, temperature)
    elif _routes_by_first(single_modality, x.shape[0]):
        first = _routing(x[:1], router_weight, router_bias,
                         None if weights is None else weights[:1], temperature, experts, router)
        rw = first.expand(x.shape[0], experts).contiguous()
    else:
        rw = _routing(x, router_weight, router_bias, weights, temperature, experts, router)
    if x.numel() == 0:
        h = x.new_zeros(*x.shape[:2], down_weight.shape[0], dtype=compute_dtype(x.dtype))
        return x.clone(), h, rw
    y, h = dispatch.get_backend(name).forward(
        x.contiguous(), down_weight, down_bias, up_weight, up_bias, rw, scale, dropout_p,
        _seed(seed), groups, _is_single_modality(x, weights, single_modality))
    return y, h, rw


@torch.library.custom_op("mlan::mm_adapter", mutates_args=())
def mm_adapter_op(x: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor,
                  up_bias: Tensor, router_weight: Optional[Tensor], router_bias: Optional[Tensor],
                  weights: Optional[Tensor], scale: float, temperature: float, dropout_p: float,
                  seed: Optional[Tensor], groups: int, single_modality: Optional[bool] = None,
                  backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias,
                         weights, scale, temperature, dropout_p, seed, groups, single_modality,
                         backend)


@mm_adapter_op.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias, weights, scale,
      temperature, dropout_p, seed, groups, single_modality=None, backend="auto"):
    batch, length, _ = x.shape
    compute = compute_dtype(x.dtype)
    h = x.new_empty(batch, length, down_weight.shape[0], dtype=compute)
    return torch.empty_like(x, memory_format=torch.contiguous_format), h, \
        x.new_empty(batch, up_weight.shape[0], dtype=compute)


def _backward_impl(grad_y, x, h, routing_weights, down_weight, down_bias, up_weight, up_bias,
                   scale, dropout_p, seed, groups, backend):
    """Token-wise gradients from the chosen backend (see mm_adapter_backward_op)."""
    if x.numel() == 0:
        return (torch.zeros_like(x), torch.zeros_like(down_weight), torch.zeros_like(down_bias),
                torch.zeros_like(up_weight), torch.zeros_like(up_bias), torch.zeros_like(routing_weights))
    name = dispatch.select_backend(x.device, x.dtype, backend)
    return tuple(dispatch.get_backend(name).backward(
        grad_y.contiguous(), x.contiguous(), h, routing_weights, down_weight, down_bias,
        up_weight, up_bias, scale, dropout_p, _seed(seed), groups))


@torch.library.custom_op("mlan::mm_adapter_backward", mutates_args=())
def mm_adapter_backward_op(grad_y: Tensor, x: Tensor, h: Tensor, routing_weights: Tensor,
                           down_weight: Tensor, down_bias: Tensor, up_weight: Tensor,
                           up_bias: Tensor, scale: float, dropout_p: float, seed: Optional[Tensor],
                           groups: int, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Token-wise gradients: (grad_x, grad_down_weight, grad_down_bias, grad_up_weight,
    grad_up_bias, grad_routing_weights [B, E] fp32); grad_x has no router term yet."""
    return _backward_impl(grad_y, x, h, routing_weights, down_weight, down_bias, up_weight,
                          up_bias, scale, dropout_p, seed, groups, backend)


@mm_adapter_backward_op.register_fake
def _(grad_y, x, h, routing_weights, down_weight, down_bias, up_weight, up_bias, scale,
      dropout_p, seed, groups, backend="auto"):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(down_weight),
            torch.empty_like(down_bias), torch.empty_like(up_weight), torch.empty_like(up_bias),
            torch.empty_like(routing_weights))


class MMAdapterFunction(torch.autograd.Function):
    """The op's one autograd path, eager and under torch.compile (which traces this Function and
    sees the two custom ops as opaque nodes with fakes).

    Forward (mlan::mm_adapter): w = router(x[:, 0]) or `weights`; H = dropout(x W_Aᵀ + b_A);
        y = x + s Σ_e w_{b,e} (H M_eᵀ + b_U[e]).
    Backward: mlan::mm_adapter_backward gives the token-wise gradients
        ∂H = s Σ_e w_e (∂y M_e) (then the dropout mask), ∂x = ∂y + ∂H W_A, ∂W_A = ∂Hᵀ x,
        ∂b_A = Σ ∂H, ∂M_e = s w_e ∂yᵀ H, ∂b_U[e] = s w_e Σ_l ∂y, ∂w_e = s <∂y, H M_eᵀ + b_U[e]>;
    then, here in fp32, the softmax + router backward
        dz = w ⊙ (∂w − <w, ∂w>) / t ;  ∂W_R = dzᵀ x0 ;  ∂b_R = Σ_b dz ;  ∂x[:, 0] += dz W_R.
    Eagerly, a backend with a one-launch router backward (triton) runs that last step.
    """

    @staticmethod
    def forward(ctx, x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias,
                weights, scale, temperature, dropout_p, seed, groups, single_modality, backend):
        y, h, rw = torch.ops.mlan.mm_adapter.default(
            x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias, weights,
            scale, temperature, dropout_p, seed, groups, single_modality, backend)
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)    # unused outputs (h, rw) get None, not zero-filled tensors
        ctx.save_for_backward(x, down_weight, down_bias, up_weight, up_bias, router_weight, h, rw, seed)
        ctx.hyper = (scale, temperature, dropout_p, groups, backend)
        ctx.weights_given = weights is not None
        ctx.by_first = _routes_by_first(single_modality, x.shape[0])
        ctx.dtypes = (weights.dtype if weights is not None else None,
                      router_weight.dtype if router_weight is not None else None)
        return y, h, rw

    @staticmethod
    def backward(ctx, grad_y, _grad_h, grad_rw):
        x, down_weight, down_bias, up_weight, up_bias, router_weight, h, rw, seed = ctx.saved_tensors
        scale, temperature, dropout_p, groups, backend = ctx.hyper
        grad_y = torch.zeros_like(x) if grad_y is None else grad_y
        grad_x, g_dw, g_db, g_uw, g_ub, grad_w = torch.ops.mlan.mm_adapter_backward.default(
            grad_y, x, h, rw, down_weight, down_bias, up_weight, up_bias, scale, dropout_p, seed,
            groups, backend)
        if grad_rw is not None:
            grad_w = grad_w + grad_rw
        token_grads = (grad_x, g_dw, g_db, g_uw, g_ub)
        no_grads = (None,) * 7                      # scale .. backend are not differentiable
        weights_dtype, router_dtype = ctx.dtypes
        fused = None                                # the backend's one-launch router backward
        if not (torch.compiler.is_compiling() or ctx.weights_given or x.shape[1] == 0):
            fused = _fused_router_backward(x, backend)
        grads = fused and fused(grad_w, rw, x, router_weight, temperature, grad_x, ctx.by_first)
        if grads is not None:
            return token_grads + grads + (None,) + no_grads
        if ctx.by_first:                            # every row was row 0: its gradient is the sum
            grad_w = grad_w.sum(0, keepdim=True)    # rows 1.. get zero (weights) / nothing (router)
        if ctx.weights_given:
            if ctx.by_first:
                grad_w = torch.cat([grad_w, grad_w.new_zeros(x.shape[0] - 1, grad_w.shape[1])])
            return token_grads + (None, None, grad_w.to(weights_dtype)) + no_grads
        if x.shape[1] == 0:                         # no routing token: the weights were a constant 1/E
            return token_grads + (torch.zeros_like(router_weight),
                                  router_weight.new_zeros(router_weight.shape[0]), None) + no_grads
        # With by_first only row 0 routed (the other rows' dz are exactly 0): rows [:1].
        routed = grad_w.shape[0]
        rw = rw[:routed]
        # (softmax's own backward kernel: one launch for w ⊙ (dw − <w, dw>), not four)
        grad_logits = torch._softmax_backward_data(grad_w, rw, -1, rw.dtype) / temperature  # [B, E]
        x0 = x[:routed, 0].to(rw.dtype)
        grad_router_weight = (grad_logits.t() @ x0).to(router_dtype)
        grad_router_bias = grad_logits.sum(0).to(router_dtype)
        grad_x[:routed, 0].add_((grad_logits @ router_weight.to(rw.dtype)).to(grad_x.dtype))  # [B, D]
        return token_grads + (grad_router_weight, grad_router_bias, None) + no_grads


def _fused_router_backward(x, backend):
    """The chosen backend's router_backward (softmax + router backward in one launch), if any."""
    name = dispatch.select_backend(x.device, x.dtype, backend)
    return getattr(dispatch.get_backend(name), "router_backward", None)


def new_dropout_seed() -> Tensor:
    """A fresh dropout seed drawn from torch's default CPU generator (follows torch.manual_seed)."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


def mm_adapter(x, down_weight, down_bias, up_weight, up_bias, router_weight=None, router_bias=None,
               weights=None, *, scale=1.0, temperature=10.0, dropout_p=0.0, seed=None, groups=1,
               single_modality=None, backend="auto", return_routing_weights=False):
    """Fused MM-Adapter: y = x + s Σ_e w_{b,e} (dropout(x W_Aᵀ + b_A) M_eᵀ + b_U[e]).

    x: [B, L, D] (fp32/fp16/bf16; fp64 on the reference backend); down_weight [r, D];
    down_bias [r]; up_weight [E, D, r/groups]; up_bias [E, D]; router_weight [E, D];
    router_bias [E]; weights: optional [B, E] routing weights replacing the router.
    seed: int or int64 tensor for the dropout mask (drawn from torch's default CPU generator
    when None and dropout_p > 0; under torch.compile the draw comes from the compiled RNG, so
    masks differ from eager ones for the same torch.manual_seed, while staying reproducible).
    single_modality: None = detect equal routing weights (one device sync) and take the fast
    path; True = route every sample by sample 0 (the caller's single-modality promise, not
    checked); False = never. Anything else raises TypeError.
    backend: "auto" | "reference" | "triton" | "cuda" | "cpu".
    Returns y [B, L, D] in x.dtype (and the [B, E] fp32 routing weights if asked).
    """
    validate_mm_adapter_args(x, down_weight, down_bias, up_weight, up_bias, router_weight,
                             router_bias, weights, scale, temperature, dropout_p, groups,
                             single_modality)
    if dropout_p == 0:
        seed = None
    elif seed is None:
        seed = new_dropout_seed()
    elif not isinstance(seed, Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64)
    y, _, rw = MMAdapterFunction.apply(
        x, down_weight, down_bias, up_weight, up_bias, router_weight, router_bias, weights,
        float(scale), float(temperature), float(dropout_p), seed, groups, single_modality, backend)
    return (y, rw) if return_routing_weights else y
