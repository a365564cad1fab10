"""BalanceMonitor / κ (our interpretation of CoMMIT): groups of a patched LaVIN, κ on a toy
two-group model where one side learns, parameters restored after probing, JSONL + plot."""
import json

import pytest
import torch
from torch import nn

from mlan_kernels.integrations.lavin import build_lavin
from mlan_kernels.integrations.tiny import tiny_clip, tiny_llama
from mlan_kernels.ops.kl_div import kl_div_logits
from mlan_kernels.training.plot import main as plot_main
from mlan_kernels.training import BalanceMonitor, balance_groups


class TwoSideToy(nn.Module):
    """A feature side (encoder) and a language side (head) over a fixed input: logits [T, V]."""

    def __init__(self, dim=8, vocab=30, dropout=0.0):
        super().__init__()
        self.encoder = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.head(self.dropout(torch.tanh(self.encoder(x))))


def toy_sides(model):
    return list(model.encoder.parameters()), list(model.head.parameters())


def train_toy(feature_lr, language_lr, steps=6, probe_every=2, log_path=None, probe_mode="train",
              dropout=0.0):
    """SGD on a fixed batch with per-side LRs; returns the monitor after `steps` steps."""
    model = TwoSideToy(dropout=dropout)
    feature, language = toy_sides(model)
    optimizer = torch.optim.SGD([dict(params=feature, lr=feature_lr), dict(params=language, lr=language_lr)])
    x, targets = torch.randn(16, 8), torch.randint(0, 30, (16,))
    monitor = BalanceMonitor(model, feature, language, probe_every=probe_every, log_path=log_path,
                             probe_mode=probe_mode, model=model)
    for step in range(steps):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        monitor.before_step(step, x, logits)
        optimizer.step()
        monitor.after_step(loss=loss, m_feat=1.0, m_lang=1.0)
    return monitor, model


@pytest.mark.parametrize("feature_lr, language_lr, side", [(0.5, 0.0, "feature"), (0.0, 0.5, "language"),
                                                          (0.5, 0.02, "feature"), (0.02, 0.5, "language")])
def test_kappa_points_to_the_side_that_learns(feature_lr, language_lr, side):
    monitor, _ = train_toy(feature_lr, language_lr)
    assert len(monitor.records) == 3
    for record in monitor.records:
        assert (record["kappa"] > 1) == (side == "feature"), record
        assert record["probe_seconds"] > 0
    assert (monitor.kappa_hat > 1) == (side == "feature")
    if language_lr == 0:
        assert all(record["kl_lang"] == 0 for record in monitor.records)


def test_probe_restores_parameters_and_matches_manual_kl():
    model = TwoSideToy()
    feature, language = toy_sides(model)
    x = torch.randn(5, 8)
    monitor = BalanceMonitor(model, feature, language, probe_every=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    logits = model(x)
    assert monitor.before_step(0, x, logits)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    record = monitor.after_step()
    for name, p in model.named_parameters():
        assert torch.equal(p, after[name]), name
    mixed = TwoSideToy()
    mixed.load_state_dict({**after, "head.weight": before["head.weight"], "head.bias": before["head.bias"]})
    expected = float(kl_div_logits(mixed(x).detach(), logits.detach()))
    assert record["kl_feat"] == pytest.approx(expected, rel=1e-6)
    assert record["kappa_ema"] == record["kappa"]                      # first probe: κ̂ = κ
    assert monitor.after_step() is None                                # nothing pending any more


def test_ema_and_probe_schedule():
    monitor, _ = train_toy(0.5, 0.05, steps=7, probe_every=3)
    assert [r["step"] for r in monitor.records] == [0, 3, 6]
    kappas = [r["kappa"] for r in monitor.records]
    expected = kappas[0]
    for kappa in kappas[1:]:
        expected = 0.9 * expected + 0.1 * kappa
    assert monitor.kappa_hat == pytest.approx(expected)
    assert monitor.mean_probe_seconds > 0


def test_eval_probe_mode_ignores_dropout_noise():
    # Feature side frozen (lr 0): with probe_mode="eval", KL_feat is exactly 0 despite dropout.
    monitor, _ = train_toy(0.0, 0.5, steps=2, probe_every=1, probe_mode="eval", dropout=0.5)
    assert all(record["kl_feat"] == 0 for record in monitor.records)
    noisy, _ = train_toy(0.0, 0.5, steps=2, probe_every=1, probe_mode="train", dropout=0.5)
    assert all(record["kl_feat"] > 0 for record in noisy.records)    # what "train" mode measures


def test_balance_groups_of_a_patched_lavin():
    model = build_lavin(tiny_llama(), tiny_clip(), neck_hidden=16, dropout_p=0.0)
    feature, language = balance_groups(model)
    feature_ids, language_ids = {id(p) for p in feature}, {id(p) for p in language}
    names = {id(p): name for name, p in model.named_parameters()}
    assert all(names[i].startswith("llama.") for i in language_ids)
    assert {names[i].split(".")[0] for i in feature_ids} == {"clip", "neck", "modality_embedding"}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert feature_ids | language_ids == trainable and not feature_ids & language_ids
    custom_feature, custom_language = balance_groups(
        model, assign=lambda name, p: "feature" if name.startswith("neck") else "language")
    assert len(custom_feature) == 4
    with pytest.raises(ValueError, match="no trainable feature-side"):
        balance_groups(TwoSideToy())


def test_monitor_on_lavin_end_to_end():
    torch.manual_seed(0)
    model = build_lavin(tiny_llama(), tiny_clip(), neck_hidden=16, dropout_p=0.0)
    feature, language = balance_groups(model)
    ids = torch.randint(0, 97, (2, 6))
    batch = dict(input_ids=ids, pixel_values=torch.randn(2, 3, 28, 28), has_image=torch.tensor([True, True]))
    optimizer = torch.optim.AdamW([dict(params=feature, lr=1e-2), dict(params=language, lr=1e-2)])
    monitor = BalanceMonitor(lambda b: model(**b).logits, feature, language, probe_every=1)
    output = model(**batch, labels=ids)
    output.loss.backward()
    monitor.before_step(0, batch, output.logits)
    optimizer.step()
    record = monitor.after_step(loss=output.loss)
    assert record["kl_feat"] > 0 and record["kl_lang"] > 0 and record["kappa"] > 0


def test_jsonl_and_plot(tmp_path):
    log = tmp_path / "run.jsonl"
    train_toy(0.5, 0.05, steps=6, probe_every=2, log_path=str(log))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 3
    assert set(rows[0]) >= {"step", "kl_feat", "kl_lang", "kappa", "kappa_ema", "m_feat", "m_lang",
                            "loss", "probe_seconds"}
    png = tmp_path / "run.png"
    assert plot_main(["balance", str(log), "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kwargs, message", [(dict(probe_every=0), "probe_every"), (dict(beta=1.0), "beta"),
                                             (dict(probe_mode="eval"), "needs `model`"),
                                             (dict(probe_mode="x"), "probe_mode")])
def test_monitor_arguments(kwargs, message):
    model = TwoSideToy()
    with pytest.raises(ValueError, match=message):
        BalanceMonitor(model, *toy_sides(model), **kwargs)


def test_monitor_drives_scheduler_multipliers():
    """Feature side learning 10× faster -> κ̂ > 1 -> the scheduler slows it, speeds language."""
    from mlan_kernels.training import BalanceScheduler, balance_param_groups
    torch.manual_seed(0)
    model = TwoSideToy()
    feature, language = toy_sides(model)
    optimizer = torch.optim.SGD(balance_param_groups(feature, language, lr=0.05))
    optimizer.param_groups[0]["initial_lr"] = 0.5                      # feature side 10× faster
    scheduler = BalanceScheduler(optimizer, alpha=0.5)
    monitor = BalanceMonitor(model, feature, language, probe_every=2)
    x, targets = torch.randn(16, 8), torch.randint(0, 30, (16,))
    for step in range(4):
        logits = model(x)
        optimizer.zero_grad()
        nn.functional.cross_entropy(logits, targets).backward()
        monitor.before_step(step, x, logits)
        optimizer.step()
        multipliers = scheduler.multipliers
        if monitor.after_step(m_feat=multipliers["feature"], m_lang=multipliers["language"]):
            scheduler.update_kappa(monitor.kappa_hat)
        scheduler.step()
    multipliers = scheduler.multipliers
    assert monitor.kappa_hat > 1 and multipliers["feature"] < 1 < multipliers["language"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * multipliers["feature"])
    assert set(monitor.records[-1]) >= {"m_feat", "m_lang"}


def test_reduce_kl_is_applied_before_kappa():
    """reduce_kl (e.g. the mean over data-parallel ranks) sees the local KLs and decides κ."""
    model = TwoSideToy()
    feature, language = toy_sides(model)
    seen = []

    def reduce(kl_feat, kl_lang):
        seen.append((kl_feat, kl_lang))
        return kl_feat, 4 * kl_lang

    plain = BalanceMonitor(model, feature, language, probe_every=1)
    reduced = BalanceMonitor(model, feature, language, probe_every=1, reduce_kl=reduce)
    x = torch.randn(6, 8)
    logits = model(x)
    plain.before_step(0, x, logits)
    reduced.before_step(0, x, logits)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    first = plain.after_step()
    second = reduced.after_step()
    assert seen == [(first["kl_feat"], first["kl_lang"])]
    assert second["kappa"] == pytest.approx(first["kappa"] / 4, rel=1e-9)


def test_unchanged_parameters_give_kl_zero_not_negative():
    model = TwoSideToy()
    monitor = BalanceMonitor(model, *toy_sides(model), probe_every=1)
    x = torch.randn(6, 8)
    monitor.before_step(0, x, model(x))
    record = monitor.after_step()                      # no optimizer step in between
    assert record["kl_feat"] == 0.0 and record["kl_lang"] == 0.0 and record["kappa"] == 1.0
