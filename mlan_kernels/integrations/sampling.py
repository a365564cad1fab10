"""Next-token choice for generation: greedy, or temperature + nucleus (top-p) sampling as in the
LLaMA reference generator that LaVIN's `generate` uses (`sample_top_p`)."""
import math
from typing import Optional

import torch
from torch import Tensor


def check_sampling_args(temperature: float, top_p: float):
    """ValueError naming the argument unless temperature >= 0 (finite) and 0 < top_p <= 1."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def next_tokens(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """logits [B, V] (any float dtype) -> next token ids [B] int64.

    temperature 0: argmax. Otherwise p = softmax(logits / temperature) in fp32; tokens sorted by
    p are kept while the mass before them is <= top_p (so at least the most likely one), the kept
    probabilities are renormalized and one token is drawn with torch.multinomial(generator).
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0.0
    sorted_probs /= sorted_probs.sum(-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)
