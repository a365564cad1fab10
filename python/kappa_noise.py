"""Noise of CoMMIT's κ (our interpretation) on a short mlan-train run, and how stable κ̂ is.

Trains with any mlan-train options (α = 0, so κ̂ does not change the run) and, at every probe,
measures log10 κ on the same update (θ_t → θ_{t+1}, φ_t → φ_{t+1}) several ways:
  same batch, eval mode, re-probed   — deterministic: spread 0 (a check)
  same batch, train mode, re-probed  — dropout masks differ per forward (dropout noise)
  other image-text batches           — a fixed pool of --pool batches, eval mode (batch noise)
  fixed batch over time              — pool batch 0 at every probe (what a fixed probe batch gives)
and the run's own κ between adjacent probes (different batches and steps). Then it replays
κ̂ over the run's (KL_feat, KL_lang): the linear EMA of κ (old default) vs the log EMA, without
and with the minimum-KL skip (rule "both": both KLs below min KL; rule "either": one side below
it, i.e. a probe where one side did not measurably move the output), and the log EMA over the
fixed batch's κ; it prints the step-to-step spread |Δ log10 κ̂| of each.
--base DIR runs on the frozen stage-1 base (LaVIN's recipe, as mlan-train --base does).

    python python/kappa_noise.py --data /tmp/kn --make-data --out /tmp/kn/run --steps 200 \\
        --probe-every 5 --dim 64 --clip-dim 64 --batch-size 8 --dropouts 0.1 0
"""
import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile

import torch

from mlan_kernels.data.collate import collate
from mlan_kernels.help_format import DefaultsHelpFormatter
from mlan_kernels.training.balance import BalanceMonitor, _copy_params, _load
from mlan_train.base import with_pretrained_base
from mlan_train.batches import batch_to
from mlan_train.cli import ensure_data, prepare
from mlan_train.evaluate import answer_mask
from mlan_train.trainer import MixedTrainer


def log10(x):
    return math.log10(x)


def spread(values):
    """{median, max} of |Δ| between neighbours and the range (max - min) of `values`."""
    steps = [abs(b - a) for a, b in zip(values, values[1:])]
    return {"med|Δ|": statistics.median(steps) if steps else 0.0, "max|Δ|": max(steps, default=0.0),
            "range": max(values) - min(values) if values else 0.0}


def within(groups):
    """median over probes of the range (max - min) of log10 κ within each group."""
    return statistics.median(max(g) - min(g) for g in groups) if groups else 0.0


def kappa_on(trainer, pending, new, batch, mask, train_mode, kls=False):
    """κ of the pending update on `batch` (p_t recomputed), model in train/eval mode
    (kls=True: (κ, KL_feat, KL_lang))."""
    monitor, module = trainer.monitor, trainer.module
    was = module.training
    module.train(train_mode)
    try:
        with torch.no_grad():
            _load(monitor.feature_params, pending["feature"]); _load(monitor.language_params, pending["language"])
            reference = monitor.forward_logits(batch)
            _load(monitor.feature_params, new[0])
            p_feat = monitor.forward_logits(batch)
            _load(monitor.feature_params, pending["feature"]); _load(monitor.language_params, new[1])
            p_lang = monitor.forward_logits(batch)
    finally:
        _load(monitor.feature_params, new[0]); _load(monitor.language_params, new[1])
        module.train(was)
    kl_feat, kl_lang = monitor._kl(p_feat, reference, mask), monitor._kl(p_lang, reference, mask)
    kappa = (kl_feat + monitor.eps) / (kl_lang + monitor.eps)
    return (kappa, kl_feat, kl_lang) if kls else kappa


def probe_pool(trainer, count):
    """`count` image-text batches of the training set (fixed, in order), with answer masks."""
    image = [i for i in range(len(trainer.train_set)) if trainer.train_set.has_image[i]]
    size = trainer.config.batch_size
    pool = []
    for k in range(count):
        indices = image[k * size:(k + 1) * size]
        batch = batch_to(collate([trainer.train_set[i] for i in indices], pad_id=trainer.tokenizer.pad_id),
                         trainer.device)
        labels = trainer.module.assemble_labels(batch["labels"], batch["attention_mask"], batch["has_image"])
        pool.append((batch, answer_mask(labels)))
    return pool


def measure(config, pool_size, repeats):
    trainer = MixedTrainer(config)
    monitor, original = trainer.monitor, trainer.monitor.after_step
    pool = probe_pool(trainer, pool_size)
    rows = []

    def after_step(loss=None, **extra):
        pending = monitor._pending
        if pending is not None:
            new = (_copy_params(monitor.feature_params), _copy_params(monitor.language_params))
            batch, mask = pending["batch"], pending["mask"]
            pooled = [kappa_on(trainer, pending, new, b, m, False, kls=True) for b, m in pool]
            rows.append({
                "fixed_kls": pooled[0][1:],
                "eval_same": [log10(kappa_on(trainer, pending, new, batch, mask, False)) for _ in range(2)],
                "train_same": [log10(kappa_on(trainer, pending, new, batch, mask, True)) for _ in range(repeats)],
                "pool": [log10(kappa) for kappa, *_ in pooled],
            })
        return original(loss=loss, **extra)

    monitor.after_step = after_step
    trainer.train()
    records = monitor.records
    return rows, records


def skips(record, min_kl, rule):
    """Whether a probe is skipped: rule "both" = both KLs below min_kl, "either" = one of them."""
    below = (record["kl_feat"] < min_kl, record["kl_lang"] < min_kl)
    return all(below) if rule == "both" else any(below)


def replay(records, ema, beta, min_kl, eps, rule="both"):
    """κ̂ after every probe of `records` for one estimator (None while all are skipped)."""
    monitor = BalanceMonitor(lambda b: b, [torch.zeros(1)], [torch.zeros(1)], beta=beta, eps=eps,
                             ema=ema, min_kl=min_kl)
    out, hat = [], None
    for r in records:
        if not skips(r, min_kl, rule):
            hat = monitor.update_ema(hat, (r["kl_feat"] + eps) / (r["kl_lang"] + eps))
        out.append(hat)
    return out


def fmt(d):
    return "  ".join(f"{k} {v:6.3f}" for k, v in d.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter,
                                     epilog="Every other option is mlan-train's (mlan-train --help).")
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.1, 0.0],
                        help="--adapter-dropout values, one run each")
    parser.add_argument("--pool", type=int, default=4, help="other probe batches")
    parser.add_argument("--repeats", type=int, default=4, help="train-mode re-probes")
    parser.add_argument("--min-kl", type=float, default=None,
                        help="min KL of the replayed stable κ̂ (default: --kappa-min-kl, else 10·ε)")
    parser.add_argument("--save", default=None,
                        help="write every probe's records and re-measurements to this JSON file")
    own, rest = parser.parse_known_args(argv)
    base = prepare(rest + ["--no-plots", "--no-progress", "--balance-alpha", "0"])
    if base.threads:
        torch.set_num_threads(base.threads)
    if base.make_data:
        ensure_data(base.data, 0, 1)
    if base.base:
        base = with_pretrained_base(base)
    saved = []
    min_kl = own.min_kl if own.min_kl is not None else (base.kappa_min_kl or 10 * base.kappa_eps)
    for dropout in own.dropouts:
        config = dataclasses.replace(base, adapter=dataclasses.replace(base.adapter, dropout_p=dropout),
                                     out=tempfile.mkdtemp(prefix="kappa-noise-"))
        rows, records = measure(config, own.pool, own.repeats)
        saved.append({"dropout": dropout, "records": records, "rows": rows})
        run = [log10(r["kappa"]) for r in records]
        print(f"\n== --adapter-dropout {dropout:g}: {len(records)} probes, log10 κ in "
              f"[{min(run):.2f}, {max(run):.2f}]; KLs: median feat {statistics.median(r['kl_feat'] for r in records):.2e}"
              f", lang {statistics.median(r['kl_lang'] for r in records):.2e}")
        print("spread of log10 κ (decades):")
        print(f"  run, adjacent probes (new batch + new step)    {fmt(spread(run))}")
        print(f"  fixed batch over time (pool batch 0)           {fmt(spread([r['pool'][0] for r in rows]))}")
        print(f"  same update, same batch, eval, re-probed       within-probe range {within([r['eval_same'] for r in rows]):.3f}")
        print(f"  same update, same batch, dropout, re-probed    within-probe range {within([r['train_same'] for r in rows]):.3f}")
        print(f"  same update, {len(rows[0]['pool'])} other batches, eval           within-probe range {within([r['pool'] for r in rows]):.3f}")
        report_estimators(records, rows, base.kappa_eps, base.kappa_beta, min_kl)
    if own.save:
        with open(own.save, "w", encoding="utf-8") as handle:
            json.dump({"argv": list(argv if argv is not None else sys.argv[1:]), "min_kl": min_kl,
                       "eps": base.kappa_eps, "beta": base.kappa_beta, "runs": saved}, handle)
    return 0


def report_estimators(records, rows, eps, beta, min_kl):
    """Step-to-step spread of each κ̂ estimator replayed over one run's probes."""
    def show(label, values, skipped=None):
        shown = [log10(v) for v in values if v is not None]
        note = "" if skipped is None else f" ({skipped} skipped)"
        final = values[-1] if values and values[-1] is not None else float("nan")
        print(f"  {(label + note):<46} {fmt(spread(shown))}  final {final:.3g}")
    fixed = [{"kl_feat": f, "kl_lang": l} for f, l in (r["fixed_kls"] for r in rows)]
    print(f"κ̂ step to step (β {beta:g}):")
    show("linear EMA of κ (original design)", replay(records, "linear", beta, 0.0, eps))
    show("log EMA of κ", replay(records, "log", beta, 0.0, eps))
    for rule in ("both", "either"):
        count = sum(skips(r, min_kl, rule) for r in records)
        show(f"log EMA, min KL {min_kl:.0e} rule {rule}", replay(records, "log", beta, min_kl, eps, rule), count)
    show("log EMA of κ on the fixed batch", replay(fixed, "log", beta, 0.0, eps))
    count = sum(skips(r, min_kl, "either") for r in fixed)
    show(f"fixed batch, min KL {min_kl:.0e} rule either", replay(fixed, "log", beta, min_kl, eps, "either"), count)
    print(f"  geometric mean of κ: run {10 ** statistics.fmean(log10(r['kappa']) for r in records):.3g}")


if __name__ == "__main__":
    sys.exit(main())
