"""The benchmark grid: ops x shapes, and for each shape our backends and the baselines built on
the same tensors (docs/performance.md: eager reference, torch.compile(reference), PEFT-style LoRA,
unfused torch, a Python loop, and y.copy_(x) as the bandwidth ceiling).

    for spec in grid(["mm_adapter_fwdbwd"], "cpu", "paper"):
        case = build_case(spec, device, dtype)      # tensors allocated here, once
        case.impls -> [Impl("cpu", "ours", {"fwd": fn, ...}), Impl("eager", "reference", ...)]

A `Spec` is an op family plus its shape; the per-family builders live in cases_adapter.py,
cases_kl.py and cases_grad_scale.py and return a `Case`. Our backends are those the op can run
on this device (triton only on CUDA tensors: the interpreter is for tests, not timings).
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

PHASES = ("fwd", "bwd", "fwd+bwd")
# CLI op name -> (op family, phases measured)
OPS = {"mm_adapter_fwd": ("mm_adapter", ("fwd",)), "mm_adapter_bwd": ("mm_adapter", ("bwd",)),
       "mm_adapter_fwdbwd": ("mm_adapter", ("fwd+bwd",)), "kl_div": ("kl_div", PHASES),
       "fused_linear_kl": ("fused_linear_kl", PHASES), "scale_grads": ("scale_grads", ("step",))}
BASELINES = ("eager", "compile", "lora", "unfused", "loop", "copy")
# Op families whose torch.compile baseline runs without --compile on CPU: the MM-Adapter's, the
# one a user would reach for instead of the fused kernel (inductor's C++ backend, ~7 s per graph
# and shape on 2 cores). On CUDA every family's runs by default.
CPU_COMPILE_DEFAULT = ("mm_adapter",)

_ADAPTER_MAIN = [dict(tokens=n, dim=d, groups=2, routing="mixed")
                 for d in (1024, 4096, 5120) for n in (2048, 16384, 65536)]
_ADAPTER_VARIANTS = [dict(tokens=n, dim=4096, groups=g, routing=routing) for n in (2048, 16384, 65536)
                     for g, routing in ((1, "mixed"), (2, "single"))]
# device type -> preset -> op family -> list of shape dicts
SHAPES = {
    "cuda": {
        "small": {"mm_adapter": [dict(tokens=n, dim=4096, groups=2, routing="mixed") for n in (2048, 16384)],
                  "kl_div": [dict(tokens=2048, vocab=32000)],
                  "fused_linear_kl": [dict(tokens=2048, hidden=4096, vocab=32000)],
                  "scale_grads": [dict(model="lavin-7b")]},
        "paper": {"mm_adapter": _ADAPTER_MAIN + _ADAPTER_VARIANTS,
                  "kl_div": [dict(tokens=t, vocab=32000) for t in (1024, 8192)],
                  "fused_linear_kl": [dict(tokens=t, hidden=4096, vocab=32000) for t in (2048, 8192)],
                  "scale_grads": [dict(model="lavin-7b")]},
    },
    "cpu": {
        "small": {"mm_adapter": [dict(tokens=512, dim=1024, groups=2, routing="mixed")],
                  "kl_div": [dict(tokens=32, vocab=32000)],
                  "fused_linear_kl": [dict(tokens=32, hidden=128, vocab=4096)],
                  "scale_grads": [dict(model="lavin-7b")]},
        # kept small enough that the whole default CPU grid runs in < 3 min on 2 cores; D = 128
        # and 512 at N = 2048 are the demo's and small models' sizes
        "paper": {"mm_adapter": [dict(tokens=n, dim=d, groups=2, routing="mixed")
                                 for d in (1024, 4096) for n in (512, 2048)]
                                + [dict(tokens=2048, dim=d, groups=2, routing="mixed") for d in (128, 512)],
                  "kl_div": [dict(tokens=t, vocab=32000) for t in (32, 128)],
                  "fused_linear_kl": [dict(tokens=512, hidden=256, vocab=8192)],
                  "scale_grads": [dict(model="lavin-7b")]},
    },
}
# "all": every combination of the paper sizes with g ∈ {1, 2} and both routings
for _device in SHAPES:
    _paper = SHAPES[_device]["paper"]
    _sizes = sorted({(s["tokens"], s["dim"]) for s in _paper["mm_adapter"]})
    SHAPES[_device]["all"] = {**_paper, "mm_adapter": [
        dict(tokens=n, dim=d, groups=g, routing=routing) for n, d in _sizes
        for g in (1, 2) for routing in ("mixed", "single")]}


@dataclass(frozen=True)
class Spec:
    """One op family at one shape; `phases` are those to measure."""
    op: str
    shape: tuple            # sorted (key, value) pairs
    phases: tuple

    @property
    def params(self) -> dict:
        return dict(self.shape)


@dataclass
class Impl:
    """One implementation of a case. role: "ours" | "reference" | "baseline" | "ceiling"."""
    name: str
    role: str
    phases: dict                                  # phase -> zero-argument callable
    outputs: Optional[Callable] = None            # -> [Tensor] compared with the reference's
    grad_forward: Optional[Callable] = None       # grad-mode forward (saved-activation bytes)
    exclude: list = field(default_factory=list)   # tensors that are not saved activations


@dataclass
class Case:
    """The tensors of one spec and every implementation that runs on them."""
    op: str
    device: torch.device
    dtype: torch.dtype
    fields: dict            # shape fields copied into every row
    label: str              # "N=2048 D=1024 g=2 mixed"
    size: int               # x axis of the plots (tokens or parameters)
    series: str             # one line per series in the plots
    min_bytes: Callable     # phase -> minimum bytes (traffic.py)
    copy_numel: int         # elements of the y.copy_(x) ceiling
    element: int            # bytes per element of the copied tensor
    impls: list
    tolerance: float


def grid(ops, device_type: str, preset: str) -> list:
    """Specs for the CLI op names `ops` on "cuda" | "cpu" with shape preset small|paper|all."""
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; expected some of {sorted(OPS)}")
    presets = SHAPES["cuda" if device_type == "cuda" else "cpu"]
    if preset not in presets:
        raise ValueError(f"shapes must be one of {sorted(presets)}, got {preset!r}")
    phases = {}
    for op in ops:
        family, op_phases = OPS[op]
        phases.setdefault(family, [])
        phases[family] += [phase for phase in op_phases if phase not in phases[family]]
    return [Spec(family, tuple(sorted(shape.items())), tuple(family_phases))
            for family, family_phases in phases.items() for shape in presets[preset][family]]


def autograd_impl(name, role, forward, inputs: dict, grad_output=None) -> Impl:
    """fwd / bwd / fwd+bwd callables of a differentiable forward(**inputs) -> Tensor.

    fwd runs under no_grad; fwd+bwd runs forward and backward and drops the grads (set to None,
    as zero_grad does); bwd replays the backward of one forward kept alive (retain_graph).
    outputs() -> [output, grad of the first input] for the check against the reference."""
    leaves = {key: value.detach().requires_grad_(True) for key, value in inputs.items()}
    kept = {}

    def clear():
        for leaf in leaves.values():
            leaf.grad = None

    def fwd():
        with torch.no_grad():
            return forward(**inputs)

    def fwd_bwd():
        forward(**leaves).backward(grad_output)
        clear()

    def bwd():
        if "output" not in kept:
            kept["output"] = forward(**leaves)
        kept["output"].backward(grad_output, retain_graph=True)
        clear()

    def outputs():
        output = forward(**leaves)
        output.backward(grad_output)
        result = [output.detach(), next(iter(leaves.values())).grad.clone()]
        clear()
        return result

    return Impl(name, role, {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}, outputs,
                lambda: forward(**leaves), list(leaves.values()) + list(inputs.values()))


def copy_impl(source: torch.Tensor) -> Impl:
    """y.copy_(x) of the op's main tensor: the bandwidth ceiling."""
    out = torch.empty_like(source)
    return Impl("copy", "ceiling", {"copy": lambda: out.copy_(source)})


def compiled(function):
    """torch.compile(function), specialized to this case's shapes (dynamo reset per case by
    the runner). The bwd phase replays one graph with retain_graph, which donated buffers forbid."""
    import torch._functorch.config
    torch._functorch.config.donated_buffer = False
    return torch.compile(function, dynamic=False)


def case_baselines(baselines, device_type: str, op: str, compile_flag) -> list:
    """The baselines of one case: "compile" stays when --compile, or without the flag
    (compile_flag None) on cuda and for the CPU_COMPILE_DEFAULT families on CPU."""
    if compile_flag is None:
        compile_flag = device_type == "cuda" or op in CPU_COMPILE_DEFAULT
    return [name for name in baselines if name != "compile" or compile_flag]


def wanted(name, role, backends, baselines) -> bool:
    """Whether implementation `name` is selected (backends: our names or None = all)."""
    if role == "ours":
        return backends is None or name in backends
    return name in baselines


def build_case(spec: Spec, device, dtype, backends=None, baselines=BASELINES) -> Case:
    """Allocate the spec's tensors on `device` and the selected implementations."""
    from . import cases_adapter, cases_grad_scale, cases_kl
    builders = {"mm_adapter": cases_adapter.build, "kl_div": cases_kl.build_kl_div,
                "fused_linear_kl": cases_kl.build_fused_linear_kl, "scale_grads": cases_grad_scale.build}
    case = builders[spec.op](spec.params, torch.device(device), dtype)
    case.impls = [impl for impl in case.impls if wanted(impl.name, impl.role, backends, baselines)]
    return case
