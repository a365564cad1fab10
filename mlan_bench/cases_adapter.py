"""MM-Adapter cases: x [B, L, D] (B = 8 samples, N = B·L tokens) in the activation dtype, fp32
adapter params (r = 8, E = 2) with non-zero up weights, a random ∂y (the tests' builder);
routing "mixed" (samples routed differently: the general per-sample path) or "single" (all
samples share x[:, 0], single_modality=None: the cpu backend detects one modality on the host
and takes its fast path; triton and GPU tensors run the general path, as None never syncs).

Implementations: ours = each fused backend that can run here (triton, cuda on GPU; cpu on CPU);
eager = mlan_kernels.reference (LaVIN-style math), compile = torch.compile of it, lora =
PEFT-style x + B(A(x)) with r = 8 in x's dtype (eager, as PEFT runs), copy = y.copy_(x).
"""
import torch

from mlan_kernels import dispatch
from mlan_kernels.ops.mm_adapter import mm_adapter
from mlan_kernels.reference import mm_adapter_reference
from mlan_kernels.testing import TOLERANCES, make_adapter_inputs, random_grad
from . import traffic
from .cases import Case, autograd_impl, compiled, copy_impl

RANK, EXPERTS, BATCH, TEMPERATURE = 8, 2, 8, 10.0
FUSED_BACKENDS = ("triton", "cuda", "cpu")


def make_inputs(tokens, dim, dtype, device, rank=RANK, experts=EXPERTS, groups=2,
                single_modality=False, batch=BATCH, param_dtype=torch.float32):
    """x [B, N/B, D] (dtype), the adapter params (param_dtype) and ∂y, from a fixed seed
    (`mlan_kernels.testing.make_adapter_inputs`, the tests' builder)."""
    params = make_adapter_inputs(batch, tokens // batch, dim, rank, experts, groups, dtype, device,
                                 param_dtype=param_dtype, single_modality=single_modality)
    x = params.pop("x")
    return x, params, random_grad(x.shape, dtype, device)


def available_backends(device: torch.device, dtype: torch.dtype) -> list:
    """Our fused backends that run tensors of this device/dtype (triton: CUDA tensors only)."""
    return [name for name in FUSED_BACKENDS
            if (name != "triton" or device.type == "cuda")
            and dispatch.unavailable_reason(name, device, dtype) is None]


def adapter_impl(backend, x, params, grad_y, groups=2, single_modality=False):
    """One of our backends through the public op (`mm_adapter`, eager autograd path)."""
    def forward(x, **p):
        return mm_adapter(x, **p, temperature=TEMPERATURE, groups=groups, backend=backend,
                          single_modality=None if single_modality else False)
    return autograd_impl(backend, "ours", forward, dict(x=x, **params), grad_y)


def reference_impl(x, params, grad_y, groups=2, compile_it=False):
    """The eager reference (role "reference") or torch.compile of it (baseline "compile")."""
    def forward(x, **p):
        return mm_adapter_reference(x, **p, temperature=TEMPERATURE, groups=groups)[0]
    if compile_it:
        return autograd_impl("compile", "baseline", compiled(forward), dict(x=x, **params), grad_y)
    return autograd_impl("eager", "reference", forward, dict(x=x, **params), grad_y)


def lora_impl(x, params, grad_y):
    """PEFT-style LoRA delta x + B(A(x)), r = RANK, weights in x's dtype."""
    rank, dim = params["down_weight"].shape
    generator = torch.Generator(device="cpu").manual_seed(1)
    lora_b = (torch.randn(dim, rank, generator=generator) * 0.02).to(device=x.device, dtype=x.dtype)

    def forward(x, lora_a, lora_b):
        return x + (x @ lora_a.t()) @ lora_b.t()
    impl = autograd_impl("lora", "baseline", forward,
                         dict(x=x, lora_a=params["down_weight"].to(x.dtype), lora_b=lora_b), grad_y)
    impl.outputs = None                      # different math: timed, not checked
    return impl


def build(shape: dict, device: torch.device, dtype: torch.dtype) -> Case:
    tokens, dim, groups, routing = shape["tokens"], shape["dim"], shape["groups"], shape["routing"]
    single = routing == "single"
    x, params, grad_y = make_inputs(tokens, dim, dtype, device, groups=groups, single_modality=single)
    impls = [adapter_impl(name, x, params, grad_y, groups, single)
             for name in available_backends(device, dtype)]
    impls += [reference_impl(x, params, grad_y, groups), reference_impl(x, params, grad_y, groups, True),
              lora_impl(x, params, grad_y), copy_impl(x)]
    fields = dict(tokens=tokens, dim=dim, rank=RANK, experts=EXPERTS, groups=groups, routing=routing)
    return Case("mm_adapter", device, dtype, fields, label=f"N={tokens} D={dim} g={groups} {routing}",
                size=tokens, series=f"D={dim} g={groups} {routing}",
                min_bytes=lambda phase: traffic.mm_adapter_bytes(phase, tokens, dim, RANK, x.element_size()),
                copy_numel=x.numel(), element=x.element_size(), impls=impls, tolerance=TOLERANCES[dtype])
