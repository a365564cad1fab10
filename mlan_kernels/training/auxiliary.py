"""CoMMIT's auxiliary loss that "promotes updating of the generation distribution" — the form
below is OUR INTERPRETATION (docs/commit_balance.md; the paper gives no equation we can use):

    L_aux = −λ · mean_answer_tokens KL(sg(p_prev) ‖ p)

p_prev: the distribution cached at the previous probe for the same kind of batch, with stopped
gradients. Minimising L_aux pushes p away from p_prev, so the model keeps moving its output and
κ stays measurable when updates become tiny. λ = 0 (the default) turns it off. Its gradient
reaches only the lagging side: backward_auxiliary(loss, params) accumulates into those
parameters' .grad and nothing else.

Lagging side: the side whose update moved the output LESS, i.e. "language" when κ̂ > 1 and
"feature" when κ̂ < 1. Note: the design doc's parenthesis "(the group with the smaller
multiplier)" contradicts this for its own multiplier formula (the side that moves less gets
the LARGER multiplier); we follow the stated intent (help the side with diminishing updates).

    logits = model(**batch).logits
    loss = task_loss + 0.0                                   # the usual loss
    loss.backward(retain_graph=aux_weight > 0)
    if aux_weight > 0 and previous_logits is not None:
        aux = auxiliary_kl_loss(logits, previous_logits, answer_mask, aux_weight)
        side = lagging_side(monitor.kappa_hat)
        if side: backward_auxiliary(aux, feature_params if side == "feature" else language_params)
"""
from typing import Iterable, Optional

import torch
from torch import Tensor

from ..ops.kl_div import kl_div_logits
from .balance import FEATURE, LANGUAGE


def lagging_side(kappa_hat: Optional[float], tolerance: float = 0.0) -> Optional[str]:
    """"language" if κ̂ > 1 + tolerance, "feature" if κ̂ < 1 − tolerance, else None."""
    if kappa_hat is None:
        return None
    if kappa_hat > 1 + tolerance:
        return LANGUAGE
    if kappa_hat < 1 - tolerance:
        return FEATURE
    return None


def auxiliary_kl_loss(logits: Tensor, previous_logits: Tensor, mask: Optional[Tensor] = None,
                      weight: float = 0.0, backend: str = "auto") -> Tensor:
    """−weight · KL(sg(softmax(previous_logits)) ‖ softmax(logits)), mean over selected rows.

    logits: [..., V] (differentiable); previous_logits: [..., V] same shape (detached here);
    mask: [...] bool answer tokens or None. Returns a 0-d fp32 tensor (0 when weight == 0).
    """
    if weight < 0:
        raise ValueError(f"weight must be >= 0 (it is λ), got {weight!r}")
    if weight == 0:
        return logits.new_zeros((), dtype=torch.float32)
    previous = previous_logits.detach().to(logits.dtype)
    return -weight * kl_div_logits(previous, logits, mask, "batchmean", backend)


def backward_auxiliary(aux_loss: Tensor, lagging_params: Iterable[torch.nn.Parameter],
                       retain_graph: bool = False):
    """Accumulate ∂aux_loss into the .grad of `lagging_params` only (no other parameter's
    gradient changes, even though the graph reaches them)."""
    params = [p for p in lagging_params if p.requires_grad]
    if not params:
        raise ValueError("lagging_params must contain at least one parameter with requires_grad")
    if aux_loss.requires_grad:
        torch.autograd.backward(aux_loss, inputs=params, retain_graph=retain_graph)
