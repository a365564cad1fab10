"""MM-Adapter benchmark cases: our backends and the baselines on the same tensors.

Each case returns callables for "fwd", "bwd" (backward of a saved forward) and "fwd+bwd".
Baselines (../shared/design/performance.md): eager reference, torch.compile(reference),
PEFT-style LoRA r=8 eager delta, and y.copy_(x) as the bandwidth ceiling.
"""
import torch
import torch._functorch.config

from mlan_kernels.ops.mm_adapter import mm_adapter
from mlan_kernels.reference import mm_adapter_reference


def make_inputs(tokens, dim, dtype, device, rank=8, experts=2, groups=2, param_dtype=torch.float32,
                single_modality=False, batch=8):
    """x [B, L, D] (activations) and fp32 adapter params with non-zero up weights."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=generator) * std).to(device=device, dtype=param_dtype)

    x = torch.randn(batch, tokens // batch, dim, generator=generator).to(device=device, dtype=dtype)
    if single_modality:
        x[:, 0] = x[0, 0]
    params = dict(down_weight=rand(rank, dim), down_bias=rand(rank), up_weight=rand(experts, dim, rank // groups),
                  up_bias=rand(experts, dim), router_weight=rand(experts, dim, std=1.0), router_bias=rand(experts))
    grad_y = torch.randn(x.shape, generator=generator).to(device=device, dtype=dtype)
    return x, params, grad_y


def _autograd_case(forward, x, params, grad_y):
    """fwd / bwd / fwd+bwd callables for a differentiable forward(x, params) -> y."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    x_leaf = x.detach().requires_grad_(True)
    saved = {}

    def fwd():
        with torch.no_grad():
            return forward(x, params)

    def fwd_bwd():
        y = forward(x_leaf, leaves)
        y.backward(grad_y)
        x_leaf.grad = None
        for leaf in leaves.values():
            leaf.grad = None

    def bwd():
        if "y" not in saved:
            saved["y"] = forward(x_leaf, leaves)
        saved["y"].backward(grad_y, retain_graph=True)
        x_leaf.grad = None
        for leaf in leaves.values():
            leaf.grad = None

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def adapter_case(backend, x, params, grad_y, groups=2, temperature=10.0, single_modality=False):
    def forward(xx, p):
        return mm_adapter(xx, **p, temperature=temperature, groups=groups, backend=backend,
                          single_modality=None if single_modality else False)
    return _autograd_case(forward, x, params, grad_y)


def reference_case(x, params, grad_y, groups=2, temperature=10.0, compiled=False):
    if compiled:  # the "bwd" phase replays one graph with retain_graph=True
        torch._functorch.config.donated_buffer = False

    def forward(xx, p):
        return mm_adapter_reference(xx, **p, temperature=temperature, groups=groups)[0]
    return _autograd_case(torch.compile(forward) if compiled else forward, x, params, grad_y)


def lora_case(x, params, grad_y):
    """PEFT-style LoRA delta x + B(A(x)) with r = rank, eager, params in x's dtype (as PEFT runs)."""
    rank, dim = params["down_weight"].shape
    lora = {"a": params["down_weight"].to(x.dtype), "b": torch.randn(dim, rank, device=x.device).to(x.dtype) * 0.02}

    def forward(xx, p):
        return xx + (xx @ p["a"].t()) @ p["b"].t()
    return _autograd_case(forward, x, lora, grad_y)


def copy_case(x):
    out = torch.empty_like(x)
    return {"copy": lambda: out.copy_(x)}
