"""KL cases. kl_div: logits p, q [T, V] (random, std 2) in the activation dtype.
fused_linear_kl: hidden states h_p, h_q [T, H] and an LM head W [V, H] in that dtype.

Implementations: ours = each KL backend that runs here ("triton" on CUDA, the compiled "cpu"
kernels on CPU, "chunked" everywhere: plain torch over blocks of rows); eager = mlan_kernels.reference (row-wise
log_softmax, full [T, V] temporaries), compile = torch.compile of it; unfused =
F.kl_div(log_softmax(q), log_softmax(p), log_target=True) as most training code writes it
(in the logits' dtype); copy = y.copy_(logits_p) (2·T·V bytes: what reading both logits once
costs, the kl_div forward's minimum traffic).
"""
import importlib.util

import torch
import torch.nn.functional as F

from mlan_kernels import dispatch
from mlan_kernels.ops.fused_linear_kl import fused_linear_kl
from mlan_kernels.ops.kl_div import kl_div_logits
from mlan_kernels.reference import kl_div_logits_reference
from mlan_kernels.testing import TOLERANCES
from . import traffic
from .cases import Case, autograd_impl, compiled, copy_impl


def kl_backends(device: torch.device) -> list:
    """Our KL backends that run on `device` (triton: CUDA tensors only; cpu: the compiled
    kernels, CPU tensors, when mlan_kernels._C is built)."""
    if device.type == "cuda":
        return (["triton"] if importlib.util.find_spec("triton") is not None else []) + ["chunked"]
    cpu_ok = dispatch.unavailable_reason("cpu", device, torch.float32, op="kl_div") is None
    return (["cpu"] if cpu_ok else []) + ["chunked"]


def _random(shape, dtype, device, seed, std=2.0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * std).to(device=device, dtype=dtype)


def _unfused_kl(logits_p, logits_q):
    return F.kl_div(F.log_softmax(logits_q, dim=-1), F.log_softmax(logits_p, dim=-1),
                    log_target=True, reduction="batchmean")


def _kl_impls(ours, reference, unfused, inputs, device):
    """Our backends, eager / compiled reference and the unfused baseline on the same inputs."""
    impls = [autograd_impl(name, "ours", lambda name=name, **t: ours(**t, backend=name), inputs)
             for name in kl_backends(device)]
    impls += [autograd_impl("eager", "reference", reference, inputs),
              autograd_impl("compile", "baseline", compiled(reference), inputs),
              autograd_impl("unfused", "baseline", unfused, inputs)]
    impls[-1].outputs = None                     # logits-dtype softmax: timed, not checked
    return impls


def build_kl_div(shape: dict, device: torch.device, dtype: torch.dtype) -> Case:
    tokens, vocab = shape["tokens"], shape["vocab"]
    inputs = dict(logits_p=_random((tokens, vocab), dtype, device, 0),
                  logits_q=_random((tokens, vocab), dtype, device, 1))
    impls = _kl_impls(kl_div_logits, kl_div_logits_reference, _unfused_kl, inputs, device)
    element = inputs["logits_p"].element_size()
    return Case("kl_div", device, dtype, dict(tokens=tokens, vocab=vocab), label=f"T={tokens} V={vocab}",
                size=tokens, series=f"V={vocab}",
                min_bytes=lambda phase: traffic.kl_div_bytes(phase, tokens, vocab, element),
                copy_numel=tokens * vocab, element=element,
                impls=impls + [copy_impl(inputs["logits_p"])], tolerance=TOLERANCES[dtype])


def _linear_ours(hidden_p, hidden_q, weight, backend):
    return fused_linear_kl(hidden_p, hidden_q, weight, backend=backend)


def _linear_reference(hidden_p, hidden_q, weight):
    return kl_div_logits_reference(hidden_p @ weight.t(), hidden_q @ weight.t())


def _linear_unfused(hidden_p, hidden_q, weight):
    return _unfused_kl(hidden_p @ weight.t(), hidden_q @ weight.t())


def build_fused_linear_kl(shape: dict, device: torch.device, dtype: torch.dtype) -> Case:
    tokens, hidden, vocab = shape["tokens"], shape["hidden"], shape["vocab"]
    inputs = dict(hidden_p=_random((tokens, hidden), dtype, device, 0, std=1.0),
                  hidden_q=_random((tokens, hidden), dtype, device, 1, std=1.0),
                  weight=_random((vocab, hidden), dtype, device, 2, std=hidden ** -0.5))
    impls = _kl_impls(_linear_ours, _linear_reference, _linear_unfused, inputs, device)
    element = inputs["weight"].element_size()
    return Case("fused_linear_kl", device, dtype, dict(tokens=tokens, hidden=hidden, vocab=vocab),
                label=f"T={tokens} H={hidden} V={vocab}", size=tokens, series=f"H={hidden} V={vocab}",
                min_bytes=lambda phase: traffic.fused_linear_kl_bytes(phase, tokens, hidden, vocab, element),
                copy_numel=vocab * hidden, element=element,
                impls=impls + [copy_impl(inputs["weight"])], tolerance=TOLERANCES[dtype])
