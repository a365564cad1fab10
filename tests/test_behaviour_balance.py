"""κ as a user of BalanceMonitor / balance_groups sees it (our interpretation of CoMMIT):
which parameters form each side, the documented defaults (probe every 10 steps, ε = 1e-12, no
probe skipped), the model's mode kept across eval probes, the record of every probe, and
errors that name the argument."""
import json

import pytest
import torch
from torch import nn
# Imported here, not only inside tiny_llama/tiny_clip: importing them takes seconds, and mutation
# testing (python/mutation.py) then pays it once at collection instead of once per mutant.
from transformers import CLIPVisionModel, LlamaForCausalLM  # noqa: F401

from mlan_kernels.integrations import patch_clip_vision, patch_llama
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama
from mlan_kernels.training import BalanceMonitor, balance_groups

from test_kappa_stability import Toy      # feature side `encoder`, language side `head`


def monitor_of(toy, **options):
    return BalanceMonitor(toy, list(toy.encoder.parameters()), list(toy.head.parameters()),
                          **options)


def probe(monitor, model, x, step=0, feature_delta=0.0, language_delta=0.0, **extra):
    """One probed step: before_step, an 'optimizer step' moving each side by its delta, after_step."""
    monitor.before_step(step, x, model(x).detach(), probe=True)
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            parameter.add_(feature_delta * torch.randn_like(parameter))
        for parameter in model.head.parameters():
            parameter.add_(language_delta * torch.randn_like(parameter))
    return monitor.after_step(**extra)


class TwoTowers(nn.Module):
    """A user's own assembly of a patched LLaMA and a patched CLIP (not a LavinModel)."""

    def __init__(self):
        super().__init__()
        self.llama = patch_llama(tiny_llama())
        self.clip = patch_clip_vision(tiny_clip())
        self.neck = nn.Linear(32, 32)                     # the user's own, trainable


def test_sides_of_a_patched_llama_and_clip_outside_lavin():
    """CLIP adapters are the feature side, LLaMA adapters the language side; only a LavinModel's
    neck is assigned by default, a user's own module is left out of both."""
    model = TwoTowers()
    feature, language = balance_groups(model)
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in feature} == {"clip"}
    assert {names[id(p)].split(".")[0] for p in language} == {"llama"}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in feature + language} == trainable - {id(p) for p in model.neck.parameters()}


def test_assign_chooses_the_side_or_leaves_a_parameter_out():
    model = Toy()
    feature, language = balance_groups(
        model, assign=lambda name, p: {"encoder.weight": "feature", "head.weight": "language"}.get(name))
    assert feature == [model.encoder.weight] and language == [model.head.weight]
    with pytest.raises(ValueError, match=r"^assign must return 'feature', 'language' or None, "
                                         r"got 'both' for encoder\.weight$"):
        balance_groups(model, assign=lambda name, p: "both")
    with pytest.raises(ValueError, match=r"^balance_groups: no trainable language-side parameters"):
        balance_groups(model, assign=lambda name, p: "feature")
    model.head.requires_grad_(False)                      # frozen parameters belong to no side
    with pytest.raises(ValueError, match=r"^balance_groups: no trainable language-side parameters"):
        balance_groups(model, assign=lambda name, p: "language" if name.startswith("head") else "feature")


def test_default_probe_schedule_is_every_ten_steps():
    monitor = monitor_of(Toy())
    assert [step for step in range(31) if monitor.should_probe(step)] == [0, 10, 20, 30]


def test_kappa_of_a_frozen_language_side_is_the_feature_kl_over_epsilon():
    """κ = (KL_feat + ε) / (KL_lang + ε), ε = 1e-12 by default."""
    torch.manual_seed(0)
    model = Toy()
    record = probe(monitor_of(model), model, torch.randn(8, 4), feature_delta=0.1)
    assert record["kl_lang"] == 0 and record["kl_feat"] > 0
    assert record["kappa"] == pytest.approx((record["kl_feat"] + 1e-12) / 1e-12, rel=1e-9)


def test_by_default_no_probe_is_skipped_even_with_both_kls_zero():
    model = Toy()
    monitor = monitor_of(model)
    record = probe(monitor, model, torch.randn(8, 4))
    assert not record["skipped"] and monitor.skipped == 0
    assert record["kappa"] == record["kappa_ema"] == monitor.kappa_hat == 1.0


@pytest.mark.parametrize("kls, skipped", [((1e-3, 0.0), False), ((0.0, 1e-3), False),
                                          ((0.5e-3, 0.5e-3), True)])
def test_a_probe_is_skipped_only_with_both_kls_strictly_below_min_kl(kls, skipped):
    model = Toy()
    monitor = monitor_of(model, min_kl=1e-3, reduce_kl=lambda kl_feat, kl_lang: kls)
    for _ in range(2):
        record = probe(monitor, model, torch.randn(8, 4), feature_delta=0.1)
    assert record["skipped"] == skipped and (monitor.kappa_hat is None) == skipped
    assert monitor.skipped == (2 if skipped else 0)


@pytest.mark.parametrize("kls, skipped", [((1e-3, 1e-3), False), ((0.5e-3, 1e-3), True),
                                          ((1e-3, 0.5e-3), True), ((0.5e-3, 0.5e-3), True)])
def test_skip_either_skips_a_probe_with_one_kl_strictly_below_min_kl(kls, skipped):
    model = Toy()
    monitor = monitor_of(model, min_kl=1e-3, skip="either", reduce_kl=lambda kl_feat, kl_lang: kls)
    for _ in range(2):
        record = probe(monitor, model, torch.randn(8, 4), feature_delta=0.1)
    assert record["skipped"] == skipped and (monitor.kappa_hat is None) == skipped
    assert monitor.skipped == (2 if skipped else 0)


def test_an_unknown_skip_rule_is_refused():
    with pytest.raises(ValueError, match=r"skip must be one of \('both', 'either'\), got 'any'"):
        monitor_of(Toy(), skip="any")


@pytest.mark.parametrize("training", [True, False])
def test_an_eval_probe_leaves_the_model_in_its_mode(training):
    model = Toy().train(training)
    monitor = monitor_of(model, probe_mode="eval", model=model)
    seen = []
    monitor.forward_logits = lambda x: (seen.append(model.training), model(x))[1]
    probe(monitor, model, torch.randn(8, 4), feature_delta=0.1, language_delta=0.1)
    assert seen == [False, False, False] and model.training == training


def test_a_step_that_is_not_probed_forgets_an_earlier_probe():
    model = Toy()
    monitor = monitor_of(model, probe_every=2)
    assert monitor.after_step() is None                   # nothing probed yet
    x = torch.randn(8, 4)
    assert monitor.before_step(0, x, model(x)) is True
    assert monitor.before_step(1, x, model(x)) is False
    assert monitor.after_step() is None and monitor.records == []
    assert monitor.before_step(2, x, model(x), probe=False) is False
    assert monitor.before_step(3, x, model(x), probe=True) is True
    assert monitor.after_step()["step"] == 3


def test_every_probe_is_recorded_with_its_extras_as_floats(tmp_path):
    torch.manual_seed(1)
    model = Toy()
    log = tmp_path / "kappa.jsonl"
    log.write_text(json.dumps({"step": -1}) + "\n")       # an earlier run's row is kept
    monitor = monitor_of(model, log_path=str(log))
    x = torch.randn(8, 4)
    records = [probe(monitor, model, x, step, 0.1, 0.05, loss=torch.tensor(2.5), m_feat=0.5)
               for step in range(3)]
    for record in records:
        assert set(record) == {"step", "kl_feat", "kl_lang", "kappa", "kappa_ema", "skipped",
                               "probe_seconds", "loss", "m_feat"}
        assert record["loss"] == 2.5 and record["m_feat"] == 0.5 and type(record["loss"]) is float
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"step": -1}] + records
    assert monitor.records == records
    assert monitor.mean_probe_seconds == pytest.approx(
        sum(r["probe_seconds"] for r in records) / 3, rel=1e-12)
    assert monitor_of(Toy()).mean_probe_seconds == 0.0
    assert "loss" not in probe(monitor, model, x, 3, 0.1, 0.1)


def test_a_state_without_an_ema_mode_was_saved_by_the_linear_ema():
    monitor = monitor_of(Toy(), ema="log")
    with pytest.raises(ValueError, match=r"^BalanceMonitor state was saved with ema='linear', "
                                         r"this monitor uses 'log'$"):
        monitor.load_state_dict({"kappa_hat": 2.0})


@pytest.mark.parametrize("options, message", [
    (dict(probe_every=0), "probe_every must be a positive int, got 0"),
    (dict(probe_every=2.0), "probe_every must be a positive int, got 2.0"),
    (dict(beta=1.0), "beta must be in [0, 1), got 1.0"),
    (dict(beta=-0.1), "beta must be in [0, 1), got -0.1"),
    (dict(probe_mode="x"), "probe_mode must be 'train' or 'eval', got 'x'"),
    (dict(probe_mode="eval"), "probe_mode='eval' needs `model` (to switch it to eval mode)"),
    (dict(ema="geometric"), "ema must be one of ('linear', 'log'), got 'geometric'"),
    (dict(min_kl=-1.0), "min_kl must be finite and >= 0, got -1.0"),
    (dict(min_kl=float("inf")), "min_kl must be finite and >= 0, got inf"),
])
def test_monitor_errors_name_the_argument(options, message):
    with pytest.raises(ValueError) as error:
        monitor_of(Toy(), **options)
    assert str(error.value) == message


def test_edges_of_the_accepted_options_and_empty_sides():
    model = Toy()
    monitor = monitor_of(model, probe_every=1, beta=0.0, min_kl=0.0, probe_mode="eval", model=model)
    assert monitor.update_ema(5.0, 2.0) == 2.0           # β = 0: κ̂ is the latest κ
    for feature, language in (([], [model.head.weight]), ([model.encoder.weight], [])):
        with pytest.raises(ValueError, match=r"^feature_params and language_params must both "
                                             r"be non-empty$"):
            BalanceMonitor(model, feature, language)


def test_assign_sees_each_parameter_and_a_shared_one_once():
    model = Toy()
    model.tied = model.head                                   # the head's parameters twice
    seen = []
    feature, language = balance_groups(
        model, assign=lambda name, p: seen.append(name) or ("feature" if p.dim() == 2 else "language"))
    assert feature == [model.encoder.weight, model.head.weight]
    assert language == [model.encoder.bias, model.head.bias]
    assert seen == ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize("probe_mode, forwards", [("train", 2), ("eval", 3)])
def test_a_train_probe_reuses_the_training_logits(probe_mode, forwards):
    """probe_mode="train": p_t is the training forward's logits, two extra forwards per probe;
    "eval" recomputes p_t in eval mode, a third."""
    model = Toy()
    calls = []
    monitor = BalanceMonitor(lambda x: (calls.append(1), model(x))[1], list(model.encoder.parameters()),
                             list(model.head.parameters()), probe_mode=probe_mode, model=model)
    probe(monitor, model, torch.randn(8, 4), feature_delta=0.1)
    assert len(calls) == forwards


@pytest.mark.parametrize("side", ["encoder", "head"])
def test_kl_is_the_mean_over_the_answer_tokens_only(side):
    torch.manual_seed(2)
    model = Toy()
    x, mask = torch.randn(8, 4), torch.tensor([True, False, False, True, True, False, False, False])
    monitor = monitor_of(model)
    reference = model(x).detach()
    monitor.before_step(0, x, reference, mask, probe=True)
    with torch.no_grad():
        weight = getattr(model, side).weight                 # one side moves
        weight.add_(0.3 * torch.randn_like(weight))
    moved = model(x).detach()
    record = monitor.after_step()
    expected = float((torch.softmax(moved[mask], -1) * (torch.log_softmax(moved[mask], -1)
                      - torch.log_softmax(reference[mask], -1))).sum(-1).mean())
    kl = record["kl_feat"] if side == "encoder" else record["kl_lang"]
    assert kl == pytest.approx(expected, rel=1e-5)


def test_probe_seconds_is_the_time_the_probe_took():
    import time
    model = Toy()
    start = time.perf_counter()
    record = probe(monitor_of(model), model, torch.randn(8, 4), feature_delta=0.1)
    assert 0 < record["probe_seconds"] <= time.perf_counter() - start


def test_16_bit_probe_logits_against_float32_training_logits():
    """A model whose forward gives bf16 logits, trained on them upcast to fp32: the probe reads
    p_t in the forward's dtype."""
    torch.manual_seed(3)
    model = Toy()
    monitor = BalanceMonitor(lambda x: model(x).to(torch.bfloat16), list(model.encoder.parameters()),
                             list(model.head.parameters()))
    record = probe(monitor, model, torch.randn(8, 4), feature_delta=0.2)
    assert record["kl_feat"] > 0 and record["kl_lang"] == 0


def test_the_kl_backend_asked_for_is_the_one_used():
    model = Toy()
    monitor = monitor_of(model, backend="no-such-backend")
    with pytest.raises(ValueError, match="^backend must be one of"):
        probe(monitor, model, torch.randn(8, 4), feature_delta=0.1)
