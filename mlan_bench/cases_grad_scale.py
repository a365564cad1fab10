"""Per-group gradient scaling over LaVIN-7B's 56 MM-Adapters (32 in LLaMA-7B, 24 in CLIP
ViT-L/14: shapes from integrations.tiny.lavin_7b_on_meta, 336 tensors, 3.1 M values), two
groups (llama, clip) as the balance trainer uses them, fp32 grads (the adapters' master
params are fp32 whatever the activation dtype), max_norm = 1e6 (the clip factor is computed
and applied but stays 1, so repeated calls leave the grads unchanged).

Implementations: ours = scale_grads_ with backend "foreach" (everywhere) and "triton" (CUDA);
loop = reference.scale_grads_reference, a Python loop over the parameters (the reference);
copy = y.copy_(x) of one flat fp32 tensor of all the grads' values.
"""
import functools
import importlib.util

import torch
from torch import nn

from mlan_kernels.ops.grad_scale import scale_grads_
from mlan_kernels.reference import scale_grads_reference
from mlan_kernels.testing import TOLERANCES
from . import traffic
from .cases import Case, Impl, copy_impl

MULTIPLIERS, MAX_NORM = (1.0, 1.0), 1e6


@functools.lru_cache(maxsize=None)
def lavin_adapter_shapes() -> dict:
    """{"llama": [param shapes of its 32 adapters], "clip": [... of its 24]} (built on meta)."""
    from mlan_kernels.integrations.lavin import build_lavin
    from mlan_kernels.integrations.patching import adapters
    from mlan_kernels.integrations.tiny import lavin_7b_on_meta
    shapes = {"llama": [], "clip": []}
    for key, adapter in adapters(build_lavin(*lavin_7b_on_meta())).items():
        shapes[key.split(".")[0]] += [tuple(param.shape) for param in adapter.parameters()]
    return shapes


def make_groups(shapes: dict, device, seed=0) -> list:
    """Parameters (with fp32 .grad, std 1e-3) of each group of `shapes`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    groups = []
    for group_shapes in shapes.values():
        params = []
        for shape in group_shapes:
            param = nn.Parameter(torch.empty(shape, device=device))
            param.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device)
            params.append(param)
        groups.append(params)
    return groups


def _impl(name, role, scale, groups, shapes, device):
    def outputs():                     # on fresh grads (same seed), so the check is independent
        fresh = make_groups(shapes, device)
        norms = scale(fresh)
        return [norms.float().cpu(), torch.cat([param.grad.flatten() for params in fresh for param in params])]
    return Impl(name, role, {"step": lambda: scale(groups)}, outputs)


def backends(device: torch.device) -> list:
    triton = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    return ["foreach", "triton"] if triton else ["foreach"]


def build(shape: dict, device: torch.device, dtype: torch.dtype) -> Case:
    shapes = lavin_adapter_shapes()
    groups = make_groups(shapes, device)
    impls = [_impl(name, "ours", lambda g, name=name: scale_grads_(g, MULTIPLIERS, MAX_NORM, backend=name),
                   groups, shapes, device) for name in backends(device)]
    impls.append(_impl("loop", "reference", lambda g: scale_grads_reference(g, MULTIPLIERS, MAX_NORM),
                       groups, shapes, device))
    numel = sum(param.numel() for params in groups for param in params)
    impls.append(copy_impl(torch.zeros(numel, device=device)))
    tensors = sum(len(params) for params in groups)
    fields = dict(model=shape["model"], adapters=56, tensors=tensors, params=numel, groups=len(groups))
    return Case("scale_grads", device, torch.float32, fields,
                label=f"56 adapters, {numel:,} fp32", size=numel,
                series="lavin-7b", min_bytes=lambda phase: traffic.scale_grads_bytes(numel, 4),
                copy_numel=numel, element=4, impls=impls, tolerance=TOLERANCES[torch.float32])
