"""The stable κ̂ (ours): EMA of log κ bounds an outlier's effect, a probe with both KLs below
min_kl is skipped, the state survives a checkpoint, mlan-train exposes the options."""
import json
import math
import os

import pytest
import torch
from torch import nn

from mlan_kernels.data.synthetic import make_synthetic
from mlan_kernels.training import BalanceMonitor
from mlan_train.cli import main
from mlan_train.config import build_parser, config_from_args


def monitor_of(**options):
    return BalanceMonitor(lambda batch: batch, [nn.Parameter(torch.zeros(1))],
                          [nn.Parameter(torch.zeros(1))], **options)


def fold(monitor, kappas):
    hat = None
    for kappa in kappas:
        hat = monitor.update_ema(hat, kappa)
    return hat


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("outlier", [1e-6, 1e6])
def test_log_ema_outlier_moves_by_at_most_its_beta_weighted_log(beta, outlier):
    monitor = monitor_of(ema="log", beta=beta)
    steady = [2.0, 3.0, 2.5, 1.5, 2.2]
    before = fold(monitor, steady)
    after = monitor.update_ema(before, outlier)
    moved = abs(math.log(after) - math.log(before))
    assert moved <= (1 - beta) * abs(math.log(outlier) - math.log(before)) * (1 + 1e-12)
    assert moved <= (1 - beta) * (abs(math.log(outlier)) + abs(math.log(before))) * (1 + 1e-12)
    # the linear EMA of the same sequence follows a large outlier much further (in log terms)
    linear = monitor_of(ema="linear", beta=beta)
    jump = abs(math.log(linear.update_ema(fold(linear, steady), outlier)) - math.log(fold(linear, steady)))
    if outlier > 1:
        assert jump > moved


def test_log_ema_of_a_constant_is_the_constant_and_lies_between_min_and_max():
    monitor = monitor_of(ema="log")
    assert fold(monitor, [3.0] * 5) == pytest.approx(3.0)
    values = [0.1, 10.0, 2.0, 1e-3, 7.0]
    assert min(values) <= fold(monitor, values) <= max(values)


def test_default_stays_the_linear_ema():
    monitor = monitor_of()
    assert monitor.ema == "linear" and monitor.min_kl == 0.0
    assert fold(monitor, [1.0, 11.0]) == pytest.approx(0.9 * 1.0 + 0.1 * 11.0)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.head = nn.Linear(4, 4), nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)))


def probe_once(monitor, model, x, step, feature_delta, language_delta):
    logits = model(x)
    monitor.before_step(step, x, logits.detach(), probe=True)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(feature_delta * torch.randn_like(p))
        for p in model.head.parameters():
            p.add_(language_delta * torch.randn_like(p))
    return monitor.after_step()


def test_probe_with_both_kls_below_min_kl_is_skipped_and_leaves_kappa_hat():
    torch.manual_seed(0)
    model = Toy()
    monitor = BalanceMonitor(model, list(model.encoder.parameters()), list(model.head.parameters()),
                             probe_every=1, ema="log", min_kl=1e-4)
    x = torch.randn(8, 4)
    first = probe_once(monitor, model, x, 0, 0.3, 0.05)
    assert not first["skipped"] and first["kappa_ema"] == first["kappa"]
    assert max(first["kl_feat"], first["kl_lang"]) >= 1e-4
    tiny = probe_once(monitor, model, x, 1, 1e-6, 1e-6)
    assert tiny["kl_feat"] < 1e-4 and tiny["kl_lang"] < 1e-4
    assert tiny["skipped"] and tiny["kappa_ema"] == first["kappa_ema"] == monitor.kappa_hat
    assert monitor.skipped == 1 and len(monitor.records) == 2
    # one KL above the minimum: not skipped
    third = probe_once(monitor, model, x, 2, 0.0, 0.3)
    assert not third["skipped"] and monitor.kappa_hat != first["kappa_ema"]


def test_all_skipped_leaves_kappa_hat_unset():
    model = Toy()
    monitor = BalanceMonitor(model, list(model.encoder.parameters()), list(model.head.parameters()),
                             min_kl=1.0)
    record = probe_once(monitor, model, torch.randn(3, 4), 0, 1e-3, 1e-3)
    assert record["skipped"] and record["kappa_ema"] is None and monitor.kappa_hat is None


def test_state_round_trip_and_mode_mismatch():
    monitor = monitor_of(ema="log", min_kl=1e-6)
    monitor.kappa_hat, monitor.skipped = 0.25, 3
    state = monitor.state_dict()
    other = monitor_of(ema="log", min_kl=1e-6)
    other.load_state_dict(state)
    assert other.kappa_hat == 0.25 and other.skipped == 3
    legacy = monitor_of()
    legacy.load_state_dict({"kappa_hat": 2.0})           # a state saved before ema/skipped
    assert legacy.kappa_hat == 2.0 and legacy.skipped == 0
    with pytest.raises(ValueError, match="ema"):
        monitor_of(ema="linear").load_state_dict(state)


@pytest.mark.parametrize("options", [dict(ema="geometric"), dict(min_kl=-1.0), dict(min_kl=float("nan"))])
def test_bad_options(options):
    with pytest.raises(ValueError):
        monitor_of(**options)


def test_mlan_train_options_defaults_and_help(capsys):
    config = config_from_args(build_parser().parse_args([]))
    # the stable κ̂ measured in docs/commit_balance.md §7 (issue 18): log EMA, min KL 10·ε per side
    assert (config.kappa_ema, config.kappa_beta, config.kappa_min_kl, config.kappa_skip) == (
        "log", 0.9, 1e-7, "either")
    help_text = " ".join(build_parser().format_help().split())
    for flag in ("--kappa-ema", "--kappa-beta", "--kappa-min-kl", "--kappa-skip"):
        assert flag in help_text
    assert "(default: log)" in help_text and "(default: either)" in help_text
    for bad in (["--kappa-ema", "x"], ["--kappa-beta", "1"], ["--kappa-min-kl", "-1"],
                ["--kappa-skip", "any"]):
        with pytest.raises(ValueError, match=bad[0]):
            config_from_args(build_parser().parse_args(bad))


TINY = ["--dim", "32", "--layers", "1", "--heads", "2", "--clip-dim", "32", "--clip-layers", "4",
        "--batch-size", "4", "--warmup-steps", "1", "--no-progress", "--eval-samples", "8",
        "--probe-every", "1", "--probe-on", "any", "--log-every", "1", "--no-plots",
        "--language-share", "0.5", "--steps", "6", "--balance-alpha", "0.5", "--kappa-ema", "log",
        "--kappa-skip", "both"]


def train(data, out, *extra):
    assert main(["--data", data, "--out", str(out), *TINY, *extra]) == 0
    with open(os.path.join(out, "run.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_resume_keeps_the_stable_kappa_state(tmp_path):
    data = str(tmp_path / "data")
    make_synthetic(data, train_size=80, eval_size=16, seed=3)
    # a minimum KL between the run's KLs: some probes are skipped, some not
    probe = train(data, tmp_path / "probe")
    kls = sorted(max(r["kl_feat"], r["kl_lang"]) for r in probe["kappa"])
    min_kl = str(math.sqrt(kls[1] * kls[2]))
    straight = train(data, tmp_path / "straight", "--kappa-min-kl", min_kl)
    assert any(r["skipped"] for r in straight["kappa"]) and not all(r["skipped"] for r in straight["kappa"])
    train(data, tmp_path / "split", "--kappa-min-kl", min_kl, "--stop-after", "3")
    resumed = train(data, tmp_path / "split", "--kappa-min-kl", min_kl,
                    "--resume", str(tmp_path / "split" / "checkpoint"))
    key = lambda run: [(r["skipped"], r["kappa_ema"]) for r in run["kappa"]]
    assert key(resumed) == key(straight)
    assert resumed["loss"] == straight["loss"]
    state = torch.load(tmp_path / "split" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["monitor"]["ema"] == "log"
    assert state["monitor"]["skipped"] == sum(r["skipped"] for r in straight["kappa"])
