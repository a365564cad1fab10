"""CoMMIT's multimodal balance coefficient κ, measured by probing (design: docs/commit_balance.md).

The paper (Wu et al. 2024, arXiv 2407.20454) publishes no code or exact equations. It says
that κ compares how much each side's update changes the generation distribution (a ratio of
KL divergences between adjacent steps). The concrete definition below is OUR INTERPRETATION:

At a probe step t (every `probe_every` steps), with batch x, feature-side parameters θ and
language-side parameters φ:
    p_t = p(y | x; θ_t, φ_t)           the training forward's logits (before optimizer.step)
    p_θ = p(y | x; θ_{t+1}, φ_t)       extra no-grad forward after the step (φ swapped back)
    p_φ = p(y | x; θ_t, φ_{t+1})       extra no-grad forward (θ swapped back)
    KL_feat = mean_answer_tokens KL(p_θ ‖ p_t),  KL_lang = mean KL(p_φ ‖ p_t)
    κ_t = (KL_feat + ε) / (KL_lang + ε),   κ̂_t = β κ̂_{t−1} + (1 − β) κ_t   (κ̂ = κ at the 1st probe)
κ > 1: the feature side moved the output more than the language side.

Stable κ̂ (ours, docs/commit_balance.md "Noise of κ"): ema="log" averages log κ instead of κ,
    log κ̂_t = β log κ̂_{t−1} + (1 − β) log κ_t,
so one outlier moves log κ̂ by at most (1 − β)·|log κ_t − log κ̂_{t−1}| instead of making κ̂ jump
to ≈ (1 − β)·κ_t; min_kl > 0 skips a probe whose two KLs are both below it (κ̂ unchanged, the
record says skipped=True): κ of two sub-min_kl KLs is a ratio of rounding noise. With
skip="either" a probe is skipped when either KL is below min_kl: a side that did not move the
output measurably makes κ a ratio of that side's noise (or of ε) to the other's step.

Usage (one training step):
    monitor = BalanceMonitor(lambda batch: model(**batch).logits, *balance_groups(model))
    logits = model(**batch).logits; loss = ...; loss.backward()
    monitor.before_step(step, batch, logits, answer_mask)   # copies θ_t, φ_t on probe steps
    optimizer.step()
    record = monitor.after_step(loss=loss)                   # None on other steps
"""
import json
import math
import time
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from ..integrations.patching import adapters
from ..ops.kl_div import kl_div_logits

FEATURE, LANGUAGE = "feature", "language"
EMA_MODES = ("linear", "log")
SKIP_RULES = ("both", "either")


def _lavin_parts(model: nn.Module):
    """(neck, modality_embedding) of a LavinModel, else ()."""
    if hasattr(model, "neck") and hasattr(model, "modality_embedding") and hasattr(model, "clip"):
        return (model.neck, model.modality_embedding)
    return ()


def balance_groups(model: nn.Module, assign: Optional[Callable[[str, nn.Parameter], Optional[str]]] = None):
    """(feature_params, language_params): the trainable parameters of a patched model by side.

    Default rule (ours, from the design doc): feature side θ = CLIP adapters ("clip.*" adapter
    keys), the visual neck and the modality embedding of a LavinModel; language side φ = LLaMA
    adapters ("llama.*" keys). `assign(name, parameter) -> "feature" | "language" | None`
    overrides it for every trainable parameter (None = leave it out of both groups).
    Raises ValueError when a side ends up empty (κ would be meaningless).
    """
    side_of = {}
    for key, adapter in adapters(model).items():
        for parameter in adapter.parameters():
            side_of[id(parameter)] = LANGUAGE if key.split(".")[0] == "llama" else FEATURE
    for part in _lavin_parts(model):
        for parameter in part.parameters():
            side_of[id(parameter)] = FEATURE
    groups = {FEATURE: [], LANGUAGE: []}
    for name, parameter in model.named_parameters():         # a shared parameter comes once
        if not parameter.requires_grad:
            continue
        side = assign(name, parameter) if assign is not None else side_of.get(id(parameter))
        if side not in (FEATURE, LANGUAGE, None):
            raise ValueError(f"assign must return 'feature', 'language' or None, got {side!r} for {name}")
        if side is not None:
            groups[side].append(parameter)
    for side, params in groups.items():
        if not params:
            raise ValueError(f"balance_groups: no trainable {side}-side parameters in the model "
                             f"(patch it / unfreeze them, or pass `assign`)")
    return groups[FEATURE], groups[LANGUAGE]


def finite_number(value) -> bool:
    """Whether `value` is an int or float (not a bool) and finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_monitor_settings(beta, eps):
    """ValueError unless beta (the κ̂ EMA's) is in [0, 1) and eps (κ's ε) a finite number > 0:
    a NaN in either makes κ̂, and every learning rate scaled by it, NaN."""
    if not (finite_number(beta) and 0.0 <= beta < 1.0):
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if not (finite_number(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def check_kappa_hat(kappa_hat, where="kappa_hat"):
    """ValueError unless κ̂ is None (no probe yet) or a finite number > 0."""
    if kappa_hat is not None and not (finite_number(kappa_hat) and kappa_hat > 0):
        raise ValueError(f"{where} must be a finite number > 0 (or null before the first probe), "
                         f"got {kappa_hat!r}")


def _copy_params(params):
    return [parameter.detach().clone() for parameter in params]


@torch.no_grad()
def _load(params, values):
    torch._foreach_copy_([p.data for p in params], values)


class BalanceMonitor:
    """Probes κ every `probe_every` steps (see the module docstring; our interpretation).

    forward_logits(batch) -> logits [..., V] of the model in its current state (called under
    no_grad); feature_params, language_params: the two groups (balance_groups(model)).
    probe_mode: "train" = exactly the design doc: two extra forwards in the model's current
    mode, p_t = the training logits. With dropout active, p_θ/p_φ/p_t use different dropout
    masks and κ measures noise as well; "eval" then gives a clean κ: the probe forwards run
    under model.eval() and p_t is recomputed that way (a third no-grad forward, in before_step).
    log_path: a JSONL file, one row per probe. reduce_kl: optional callable
    (kl_feat, kl_lang) -> (kl_feat, kl_lang) applied before κ, e.g. the mean over data-parallel
    ranks so every rank computes the same κ̂ (and the same learning rates).
    ema: "linear" (default, the design doc's EMA of κ) or "log" (EMA of log κ, ours; robust to
    single-probe outliers). min_kl: probes with kl_feat < min_kl and kl_lang < min_kl are
    skipped (κ̂ unchanged, record["skipped"] = True); 0 (default) skips none. skip: "both"
    (default, as just said) or "either" (kl_feat < min_kl or kl_lang < min_kl). Memory: one copy of each group, twice (θ_t, φ_t,
    and θ_{t+1}, φ_{t+1} while swapping) — a few MB for LaVIN's adapters.
    """

    def __init__(self, forward_logits: Callable, feature_params: Iterable[nn.Parameter],
                 language_params: Iterable[nn.Parameter], probe_every: int = 10, beta: float = 0.9,
                 eps: float = 1e-12, probe_mode: str = "train", model: Optional[nn.Module] = None,
                 log_path: Optional[str] = None, backend: str = "auto",
                 reduce_kl: Optional[Callable[[float, float], tuple]] = None,
                 ema: str = "linear", min_kl: float = 0.0, skip: str = "both"):
        if not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"probe_every must be a positive int, got {probe_every!r}")
        check_monitor_settings(beta, eps)
        if probe_mode not in ("train", "eval"):
            raise ValueError(f"probe_mode must be 'train' or 'eval', got {probe_mode!r}")
        if probe_mode == "eval" and model is None:
            raise ValueError("probe_mode='eval' needs `model` (to switch it to eval mode)")
        if ema not in EMA_MODES:
            raise ValueError(f"ema must be one of {EMA_MODES}, got {ema!r}")
        if not (finite_number(min_kl) and min_kl >= 0):
            raise ValueError(f"min_kl must be finite and >= 0, got {min_kl!r}")
        if skip not in SKIP_RULES:
            raise ValueError(f"skip must be one of {SKIP_RULES}, got {skip!r}")
        self.ema, self.min_kl, self.skip = ema, float(min_kl), skip
        self.skipped = 0
        self.forward_logits, self.model = forward_logits, model
        self.feature_params, self.language_params = list(feature_params), list(language_params)
        if not self.feature_params or not self.language_params:
            raise ValueError("feature_params and language_params must both be non-empty")
        self.probe_every, self.beta, self.eps, self.probe_mode = probe_every, beta, eps, probe_mode
        self.log_path, self.backend, self.reduce_kl = log_path, backend, reduce_kl
        self.kappa_hat: Optional[float] = None
        self.records: list[dict] = []
        self._pending = None

    def should_probe(self, step: int) -> bool:
        return step % self.probe_every == 0

    def _forward(self, batch) -> Tensor:
        with torch.no_grad():
            if self.probe_mode == "train":
                return self.forward_logits(batch).detach()
            was_training = self.model.training
            self.model.eval()
            try:
                return self.forward_logits(batch).detach()
            finally:
                self.model.train(was_training)

    def before_step(self, step: int, batch, logits: Tensor, mask: Optional[Tensor] = None,
                    probe: Optional[bool] = None) -> bool:
        """Call after backward, before optimizer.step(). On probe steps keeps θ_t, φ_t copies
        and p_t (logits [..., V], the training forward's; mask [...] bool = answer tokens).
        probe: None = every probe_every steps; True/False overrides the schedule (e.g. to probe
        only image-text batches). Returns whether this step is probed."""
        if not (self.should_probe(step) if probe is None else probe):
            self._pending = None
            return False
        start = time.perf_counter()
        reference = logits.detach() if self.probe_mode == "train" else self._forward(batch)
        self._pending = dict(step=step, batch=batch, mask=mask, reference=reference,
                             feature=_copy_params(self.feature_params),
                             language=_copy_params(self.language_params),
                             seconds=time.perf_counter() - start)
        return True

    def _kl(self, logits, reference, mask) -> float:
        """mean over selected rows of KL(softmax(logits) ‖ softmax(reference)), clamped at 0; 16-bit logits
        stay 16-bit (the fused kernel accumulates in fp32, no [T, V] fp32 copy)."""
        kl = float(kl_div_logits(logits, reference.to(logits.dtype), mask, "batchmean", self.backend))
        return max(kl, 0.0)          # KL ≥ 0; rounding can give -1e-8 for (nearly) equal rows

    def after_step(self, loss=None, **extra) -> Optional[dict]:
        """Call after optimizer.step(). On probe steps: the two probe forwards, κ, κ̂, a JSONL
        row; returns the record (dict), else None. `extra` (e.g. m_feat, grad_norm_lang) is
        logged as given (tensors become floats)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        start = time.perf_counter()
        feature_new, language_new = _copy_params(self.feature_params), _copy_params(self.language_params)
        try:
            _load(self.language_params, pending["language"])             # (θ_{t+1}, φ_t)
            logits_feature = self._forward(pending["batch"])
            _load(self.feature_params, pending["feature"])               # (θ_t, φ_{t+1})
            _load(self.language_params, language_new)
            logits_language = self._forward(pending["batch"])
        finally:
            _load(self.feature_params, feature_new)                      # (θ_{t+1}, φ_{t+1})
            _load(self.language_params, language_new)
        kl_feat = self._kl(logits_feature, pending["reference"], pending["mask"])
        kl_lang = self._kl(logits_language, pending["reference"], pending["mask"])
        if self.reduce_kl is not None:
            kl_feat, kl_lang = self.reduce_kl(kl_feat, kl_lang)
        kappa = (kl_feat + self.eps) / (kl_lang + self.eps)
        below = (kl_feat < self.min_kl, kl_lang < self.min_kl)
        skipped = all(below) if self.skip == "both" else any(below)
        if skipped:
            self.skipped += 1
        else:
            self.kappa_hat = self.update_ema(self.kappa_hat, kappa)
        record = dict(step=pending["step"], kl_feat=kl_feat, kl_lang=kl_lang, kappa=kappa,
                      kappa_ema=self.kappa_hat, skipped=skipped,
                      probe_seconds=pending["seconds"] + time.perf_counter() - start)
        if loss is not None:
            extra = dict(loss=loss, **extra)
        record.update({key: float(value.detach()) if isinstance(value, Tensor) else float(value)
                       for key, value in extra.items()})
        self.records.append(record)
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        return record

    def update_ema(self, kappa_hat: Optional[float], kappa: float) -> float:
        """κ̂ after one probe's κ (κ at the first probe): linear or log EMA (self.ema)."""
        if kappa_hat is None:
            return kappa
        if self.ema == "log":
            return math.exp(self.beta * math.log(kappa_hat) + (1 - self.beta) * math.log(kappa))
        return self.beta * kappa_hat + (1 - self.beta) * kappa

    @property
    def mean_probe_seconds(self) -> float:
        """Average extra wall time of a probe (copies + probe forwards + KLs), seconds."""
        return sum(r["probe_seconds"] for r in self.records) / max(len(self.records), 1)

    def state_dict(self) -> dict:
        return {"kappa_hat": self.kappa_hat, "ema": self.ema, "skipped": self.skipped}

    def load_state_dict(self, state: dict):
        """Restores κ̂ and the skipped-probe count (states saved before these keys: count 0).
        A state saved with the other EMA mode is refused: κ̂ would continue a different average."""
        ema = state.get("ema", "linear")
        if ema != self.ema:
            raise ValueError(f"BalanceMonitor state was saved with ema={ema!r}, this monitor uses {self.ema!r}")
        check_kappa_hat(state.get("kappa_hat"), "BalanceMonitor state's kappa_hat")
        skipped = state.get("skipped", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"BalanceMonitor state's skipped must be an int >= 0, got {skipped!r}")
        self.kappa_hat, self.skipped = state["kappa_hat"], skipped
