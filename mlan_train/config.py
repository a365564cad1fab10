"""Configuration of the mixed-modality training program (`mlan-train`, python/train_mixed.py).

Defaults: a tiny LLaMA (D=128, 2 layers) + tiny CLIP (4 blocks, 28 px) built in code and
trained from scratch on the synthetic task (`--train-base`, because a frozen random base
cannot learn much). LaVIN's own recipe (frozen base, adapters + neck only, AdamW, lr 9e-3 at
batch 32·4 GPUs, weight decay 0.02, warm-up then cosine, 20 epochs) is what `--llama/--clip`
run (`--no-train-base` is then the default) and what `--base DIR` runs on a tiny base
pretrained once into DIR (the demo: `--base runs/base --lr 1e-2`).
"""
import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from mlan_kernels.config import PLACEMENTS, AdapterConfig, check_settings
from mlan_kernels.data.records import MAX_IMAGE_PIXELS
from mlan_kernels.data.templates import TEMPLATE_NAMES
from mlan_kernels.dispatch import BACKENDS
from mlan_kernels.help_format import DefaultsHelpFormatter

NAN_POLICIES = ("error", "skip-step")
# A --max-length that cuts answer tokens of more records than this share is refused
# (--allow-truncation overrides): such runs would silently train on half answers or none.
MAX_TRUNCATED_SHARE = 0.01
# AdapterConfig field -> the option that sets it (flag --adapter-scale; the same name in
# run.json and checkpoints): the flags the program always had, mapped here and nowhere else.
ADAPTER_FLAGS = {"rank": "rank", "experts": "experts", "groups": "groups",
                 "scale": "adapter_scale", "temperature": "temperature",
                 "dropout_p": "adapter_dropout", "placement": "placement"}


@dataclass
class TrainConfig:
    data: str = "data/synthetic"             # a LLaVA .json/.jsonl file, or a directory with
                                              # train.json(l) [+ eval.json(l)] [+ tokenizer.json]
    image_folder: Optional[str] = None        # image paths start here (default: the data file's directory)
    allow_absolute_image_paths: bool = False  # accept absolute "image" paths (else skipped)
    eval_data: Optional[str] = None           # held-out .json/.jsonl file (default: DATA/eval.json(l))
    eval_fraction: float = 0.0                # hold out this share of the training file instead
    out: str = "runs/mixed"                   # run directory (run.json, plots, checkpoints)
    language_share: float = 0.875             # fraction of text-only samples per epoch (MLAN)
    samples_per_epoch: Optional[int] = None   # default: as many as the share allows
    steps: int = 1500                         # optimizer steps
    batch_size: int = 16                      # per rank and micro-batch
    grad_accum: int = 1                       # micro-batches per optimizer step
    lr: float = 2e-3                          # peak learning rate (base model, when trained)
    weight_decay: float = 0.02                # LaVIN's
    warmup_steps: int = 40
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0                # per balance group, fused (scale_grads_); 0 = no clipping
    seed: int = 0
    train_base: Optional[bool] = None         # train LLaMA/CLIP too; default: yes for the tiny
                                              # random-init models, no with --llama (LaVIN)
    # model (tiny, built in code) — ignored for a part given as a local checkpoint
    base: Optional[str] = None                # stage 1: pretrain a tiny LLaMA/CLIP base here unless
                                              # present, then train adapters on it frozen (LaVIN)
    base_steps: int = 600                     # stage-1 AdamW steps of each base model
    base_seed: int = 0                        # stage-1 seed (--seed is stage 2's: one base, many seeds)
    llama: Optional[str] = None               # local HF LlamaForCausalLM directory
    clip: Optional[str] = None                # local HF CLIPVisionModel directory
    tokenizer: Optional[str] = None           # tokenizer.json (default: DATA/tokenizer.json or the --llama one)
    template: str = "auto"                    # conversation template (data/templates.py): auto = the
                                              # tokenizer's chat template if it has one, else mlan
    strict_vocab: bool = False                # template words / answers the tokenizer cannot
                                              # spell (unknown token) are an error, not a warning
    dim: int = 128
    layers: int = 2
    heads: int = 4
    clip_dim: int = 128
    clip_layers: int = 4
    image_size: int = 28
    patch_size: int = 4
    clip_every: int = 4                       # the neck reads every N-th CLIP block (K = depth / N)
    max_length: Optional[int] = None          # tokens per sample (default 64 tiny, 512 with --llama)
    allow_truncation: bool = False            # train even if --max-length cuts answer tokens of
                                              # more than MAX_TRUNCATED_SHARE of the records
    max_image_pixels: int = MAX_IMAGE_PIXELS  # images above width x height are skipped at load
                                              # (read from the header; 0 = no limit)
    # the adapters' settings (LaVIN's defaults: r=8, 2 experts, 2 groups, temperature 10,
    # scale 1, dropout 0.1 at attn); command-line flags and saved names: ADAPTER_FLAGS
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    backend: str = "auto"                     # op backend of the adapters
    # CoMMIT balancing (our interpretation, docs/commit_balance.md)
    probe_every: int = 10                     # κ probe interval (0 = no probing)
    probe_start: Optional[int] = None         # first step a probe may run (None = --warmup-steps:
                                              # during warm-up κ measures a near-zero LR's
                                              # rounding and seeds κ̂ with it; commit_balance.md §2)
    kappa_eps: float = 1e-8                   # ε of κ = (KL_feat + ε) / (KL_lang + ε): fp32 KLs
                                              # below ~1e-8 are rounding noise, not learning
    kappa_ema: str = "log"                    # κ̂ = EMA of "log" κ (ours, the geometric mean; the
                                              # stable choice measured in docs/commit_balance.md §7)
                                              # or of "linear" κ (the original design)
    kappa_beta: float = 0.9                   # β of the κ̂ EMA
    kappa_min_kl: float = 1e-7                # skip a probe whose KLs are below this (κ̂ unchanged;
                                              # 0 = never skip): 10·ε, where κ is mostly ε
    kappa_skip: str = "either"                # "either": skip when one KL is below --kappa-min-kl
                                              # (ours, §7); "both": only when both are
    probe_on: str = "image"                   # "image": a due probe waits for an image-text batch
                                              # (on text-only ones the vision side cannot move
                                              # the output, so κ says nothing); "any"
    balance_alpha: float = 0.0                # 0 = constant multipliers (κ only measured)
    aux_weight: float = 0.0                   # λ of CoMMIT's auxiliary loss (ours): at a probe, the
                                              # batch of the previous probe of the same kind is
                                              # re-forwarded and −λ·KL(sg(p_prev) ‖ p) trains the
                                              # lagging side only; 0 = off
    nan_policy: str = "error"                 # non-finite loss or gradient: "error" stops the run
                                              # naming the step; "skip-step" skips that update
                                              # (as AMP's GradScaler does) and counts it
    # bookkeeping
    eval_every: int = 0                       # 0 = only at the end
    eval_samples: Optional[int] = None        # cap on held-out samples per modality
    save_every: int = 0                       # checkpoint interval in steps (0 = only at the end)
    resume: Optional[str] = None              # checkpoint directory to resume from (with
                                              # --shares: the sweep's --out; each share resumes
                                              # from its own share-S/checkpoint when present)
    log_every: int = 10
    progress: bool = True                     # tqdm bar (rank 0)
    device: str = "auto"
    plots: bool = True
    shares: list = field(default_factory=list)  # several runs, one per share (table at the end)
    sweep: bool = False                       # shares 0, 0.5, 0.875, 1 (the design doc's sweep)
    threads: int = 0                          # torch CPU threads (0 = torch's default)
    make_data: bool = False                   # generate the synthetic task into --data if absent
    compare_backends: bool = False            # time fwd+bwd per adapter backend after training
    stop_after: int = 0                       # end this invocation after N steps (checkpointed)
    predict: Optional[str] = None             # JSON file of questions: answers -> OUT/predictions.json
    max_new_tokens: int = 64                  # --predict: longest answer in tokens


HELP = {   # one line of --help per TrainConfig field; the formatter appends "(default: X)"
    "data": "dataset: a LLaVA .json list or a .jsonl file, or a directory with train.json or "
            "train.jsonl (and optionally eval.json(l), tokenizer.json)",
    "image_folder": "folder the records' image paths are relative to (LLaVA's --image_folder; "
                    "default: the data file's directory); paths leaving it are skipped",
    "allow_absolute_image_paths": "accept absolute image paths (default: skipped and counted)",
    "eval_data": "held-out .json/.jsonl file (default: eval.json(l) beside train.json(l); none: "
                 "no held-out evaluation)",
    "eval_fraction": "hold out this share of the training records for evaluation, in [0, 1)",
    "out": "run directory (run.json, plots, checkpoint/)",
    "language_share": "fraction of text-only samples per epoch (MLAN's language share)",
    "samples_per_epoch": "samples per epoch (default: as many as the share allows)",
    "steps": "optimizer steps",
    "batch_size": "samples per rank and micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "weight_decay": "AdamW weight decay of >= 2-D weights (LaVIN's value)",
    "warmup_steps": "linear warm-up steps before the cosine decay",
    "min_lr_ratio": "final learning rate as a fraction of --lr",
    "max_grad_norm": "gradient clipping per CoMMIT side (fused scale_grads_); 0 = no clipping",
    "seed": "seed of the models, the mixture and the batches",
    "train_base": "train LLaMA/CLIP too (default: yes for the tiny random models, no with --llama)",
    "base": "LaVIN's recipe on a pretrained tiny base: pretrain the tiny LLaMA (language model on "
            "statements) and CLIP (scene attributes) into this directory unless it holds them "
            "(stage 1), then train only adapters, neck and modality token on them, frozen",
    "base_steps": "stage 1 (--base): AdamW steps of the LLaMA and of the CLIP pretraining",
    "base_seed": "stage 1 (--base): seed of the base models (--seed seeds stage 2 only)",
    "llama": "local HF LlamaForCausalLM directory (default: a tiny LLaMA built in code)",
    "clip": "local HF CLIPVisionModel directory (default: a tiny CLIP built in code)",
    "tokenizer": "tokenizer.json or a HF tokenizer directory (default: the --llama directory's, "
                 "else DATA/tokenizer.json)",
    "template": "conversation template: auto (the tokenizer's chat template if it has one, else "
                "mlan), chat, mlan ('user : Q assistant : A'), plain, vicuna_v1, llava_llama_3",
    "strict_vocab": "template words or answer tokens that map to the unknown token are an error",
    "dim": "hidden size of the tiny LLaMA",
    "layers": "decoder layers of the tiny LLaMA",
    "heads": "attention heads of the tiny LLaMA",
    "clip_dim": "hidden size of the tiny CLIP",
    "clip_layers": "blocks of the tiny CLIP (a multiple of 4: the neck reads every 4th)",
    "image_size": "image side in pixels (tiny CLIP)",
    "patch_size": "patch side in pixels (tiny CLIP)",
    "clip_every": "the neck reads CLIP's summary token after every N-th block (LaVIN: 4)",
    "max_length": "tokens per sample (default: 64 for the tiny models, 512 with --llama)",
    "allow_truncation": "train even if --max-length cuts answer tokens of more than 1%% of records",
    "max_image_pixels": "skip images above this many pixels, read from the header (0 = no limit)",
    "rank": "adapter rank r",
    "experts": "adapter experts E",
    "groups": "groups g of the up-projection (divides --rank)",
    "temperature": "router softmax temperature",
    "adapter_scale": "adapter output scale s (AdapterConfig.scale)",
    "adapter_dropout": "dropout probability on the adapter's down-projection (AdapterConfig.dropout_p)",
    "placement": "adapter sites: 'attn' (LaVIN's, before attention) or 'block' (also before the MLP)",
    "backend": "MM-Adapter op backend (auto, " + ", ".join(BACKENDS) + ")",
    "probe_every": "κ probe interval in steps, 0 = no probing",
    "probe_start": "first step a κ probe may run (default: --warmup-steps; 0 = from the start)",
    "kappa_eps": "ε of κ = (KL_feat + ε) / (KL_lang + ε)",
    "kappa_ema": "κ̂ = EMA of 'linear' κ (the original design) or of 'log' κ (ours: a "
                 "geometric mean, one outlier moves log κ̂ by at most (1-β)·its log distance)",
    "kappa_beta": "β of the κ̂ EMA, in [0, 1)",
    "kappa_min_kl": "skip a probe whose KL_feat and KL_lang are both below this: κ̂ unchanged, "
                    "the record says skipped (0 = never skip)",
    "kappa_skip": "'both': skip a probe when both KLs are below --kappa-min-kl; 'either': when "
                  "one of them is (that side did not measurably move the output)",
    "probe_on": "'image': a due probe waits for an image-text batch; 'any': probe on schedule",
    "balance_alpha": "CoMMIT LR exponent α; 0 = constant multipliers (κ only measured)",
    "aux_weight": "λ of the auxiliary loss −λ·KL(sg(p_prev) ‖ p) on the previous probe's batch, "
                  "backpropagated into the lagging side only, at probe steps (ours); 0 = off",
    "nan_policy": "non-finite loss or gradient: 'error' stops naming the step, 'skip-step' "
                  "skips that update",
    "eval_every": "held-out evaluation interval in steps (0 = only at the end)",
    "eval_samples": "held-out samples per modality (default: all)",
    "save_every": "checkpoint interval in steps (0 = only at the end)",
    "resume": "checkpoint directory to resume from (with --shares: the sweep's --out)",
    "log_every": "loss/LR logging interval in steps",
    "progress": "tqdm progress bar (rank 0)",
    "device": "auto, cpu, cuda or cuda:N",
    "plots": "write loss.png and balance.png",
    "shares": "language shares to train one run each, e.g. 0.5 0.875",
    "sweep": "train shares 0, 0.5, 0.875 and 1, then a table and shares.png",
    "threads": "torch CPU threads (0 = torch's default)",
    "make_data": "generate the synthetic task into --data if it is absent",
    "compare_backends": "time forward+backward per adapter backend after training",
    "stop_after": "end this invocation after N steps, checkpointed (0 = run to --steps)",
    "predict": "after training, answer the questions of this JSON file (LLaVA records or "
               "{id, question, image}) into OUT/predictions.json",
    "max_new_tokens": "--predict: longest answer in tokens",
}


class UsageError(ValueError):
    """A command-line error (argparse's): main() prints it as one line and exits 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error raises UsageError instead of printing usage and exiting, so
    every user error of the program leaves through the same one-line path."""

    def error(self, message):
        raise UsageError(message)


def build_parser(defaults: Optional[TrainConfig] = None) -> argparse.ArgumentParser:
    """An argparse parser with one --option per TrainConfig field (booleans: --x / --no-x)."""
    defaults = defaults or TrainConfig()
    parser = OneLineParser(prog="mlan-train", description="Train a LaVIN-patched LLaMA + CLIP on an MLAN mixture of "
                           "text-only and image-text instructions.",
                           formatter_class=DefaultsHelpFormatter)
    for item in dataclasses.fields(TrainConfig):
        flag = "--" + item.name.replace("_", "-")
        default = getattr(defaults, item.name)
        if item.name == "adapter":
            _add_adapter_flags(parser, default)
        elif _base_type(item.type) == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=HELP[item.name])
        elif item.name == "shares":
            parser.add_argument(flag, type=float, nargs="+", default=default, help=HELP[item.name])
        else:
            kind = {"int": int, "float": float, "str": str}.get(_base_type(item.type), str)
            parser.add_argument(flag, type=kind, default=default, help=HELP[item.name])
    return parser


def _add_adapter_flags(parser, defaults: AdapterConfig):
    """One flag per ADAPTER_FLAGS entry, typed as its AdapterConfig field."""
    kinds = {item.name: _base_type(item.type) for item in dataclasses.fields(AdapterConfig)}
    for name, option in ADAPTER_FLAGS.items():
        extra = {"choices": PLACEMENTS} if name == "placement" else {
            "type": {"int": int, "float": float}[kinds[name]]}
        parser.add_argument(_flag(option), dest=option, default=getattr(defaults, name),
                            help=HELP[option], **extra)


def options_dict(config: "TrainConfig") -> dict:
    """{option: value} of `config` with the adapter settings under their option names
    (ADAPTER_FLAGS): the flat form run.json and checkpoints record, and resume compares."""
    values = {item.name: getattr(config, item.name) for item in dataclasses.fields(config)
              if item.name != "adapter"}
    return values | {option: getattr(config.adapter, name) for name, option in ADAPTER_FLAGS.items()}


def _base_type(annotation) -> str:
    text = annotation if isinstance(annotation, str) else (
        annotation.__name__ if isinstance(annotation, type) else str(annotation))  # Optional[int]
    for name in ("int", "float", "str", "bool"):
        if name in text:
            return name
    return "str"


def config_from_args(namespace: argparse.Namespace) -> TrainConfig:
    settings = {name: getattr(namespace, option) for name, option in ADAPTER_FLAGS.items()}
    settings["compat"] = None
    check_settings(settings, spell=lambda name: _flag(ADAPTER_FLAGS[name]))
    values = {item.name: getattr(namespace, item.name) for item in dataclasses.fields(TrainConfig)
              if item.name != "adapter"}
    config = TrainConfig(**values, adapter=AdapterConfig(**settings))
    validate(config)
    return config


def max_length(config) -> int:
    """--max-length, else 64 for the tiny synthetic models (--base's too) and 512 with --llama."""
    return config.max_length or (512 if config.llama and not config.base else 64)


FLOAT_RANGES = {            # option: (check, accepted values); every float must also be finite
    "language_share": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "min_lr_ratio": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "eval_fraction": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    "kappa_eps": (lambda v: v > 0, "> 0"),
    "kappa_beta": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "kappa_min_kl": (lambda v: v >= 0, ">= 0 (0 = never skip)"),
    "balance_alpha": (lambda v: v >= 0, ">= 0"),
    "aux_weight": (lambda v: v >= 0, ">= 0 (0 = off)"),
}
POSITIVE_INTS = ("steps", "batch_size", "grad_accum", "dim", "layers", "heads", "clip_dim",
                 "clip_layers", "image_size", "patch_size", "base_steps", "clip_every",
                 "max_new_tokens")
NON_NEGATIVE_INTS = ("probe_every", "save_every", "eval_every", "stop_after", "threads",
                     "max_image_pixels")
SEED_LIMIT = 2**32


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(config: TrainConfig):
    """ValueError naming the option and the accepted values for the first bad setting."""
    checks = []
    for name, (check, expected) in FLOAT_RANGES.items():
        value = getattr(config, name)
        checks.append((name, math.isfinite(value) and check(value),
                       expected if expected.startswith("a finite") else f"finite and {expected}"))
    checks += [(name, getattr(config, name) > 0, "> 0") for name in POSITIVE_INTS]
    checks += [(name, getattr(config, name) >= 0, ">= 0") for name in NON_NEGATIVE_INTS]
    checks += [
        ("seed", 0 <= config.seed < SEED_LIMIT, "in [0, 2^32)"),
        ("base_seed", 0 <= config.base_seed < SEED_LIMIT, "in [0, 2^32)"),
        ("warmup_steps", 0 <= config.warmup_steps < config.steps, "in [0, steps)"),
        ("probe_on", config.probe_on in ("image", "any"), "'image' or 'any'"),
        ("kappa_ema", config.kappa_ema in ("log", "linear"), "'log' or 'linear'"),
        ("kappa_skip", config.kappa_skip in ("both", "either"), "'both' or 'either'"),
        ("nan_policy", config.nan_policy in NAN_POLICIES, " or ".join(map(repr, NAN_POLICIES))),
        ("backend", config.backend in ("auto",) + BACKENDS, f"one of {('auto',) + BACKENDS}"),
        ("device", _device_ok(config.device), "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("clip_layers", bool(config.clip) or config.clip_every < 1
         or config.clip_layers % config.clip_every == 0,
         f"a multiple of {config.clip_every} (--clip-every: the neck taps every N-th block)"),
        ("template", config.template in TEMPLATE_NAMES, " or ".join(map(repr, TEMPLATE_NAMES))),
        ("shares", all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in config.shares), "values in [0, 1]"),
        ("log_every", config.log_every >= 1, ">= 1"),
    ]
    optional_positive = [("samples_per_epoch", config.samples_per_epoch),
                         ("eval_samples", config.eval_samples)]
    checks += [(name, value is None or value > 0, "> 0") for name, value in optional_positive]
    checks.append(("probe_start", config.probe_start is None or 0 <= config.probe_start < config.steps,
                   "in [0, steps)"))
    checks.append(("max_length", config.max_length is None or config.max_length >= 2,
                   ">= 2 (<s> + one answer token)"))
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"{_flag(name)} must be {expected}, got {getattr(config, name)!r}")
    _validate_shapes(config)
    if config.eval_data is not None and config.eval_fraction > 0:
        raise ValueError("--eval-data and --eval-fraction both choose the held-out set: pass one")
    if config.balance_alpha > 0 and config.probe_every == 0:
        raise ValueError("--balance-alpha needs κ probes: set --probe-every > 0")
    if config.aux_weight > 0 and config.probe_every == 0:
        raise ValueError("--aux-weight needs κ probes (the lagging side, the cached batch): "
                         "set --probe-every > 0")


def _device_ok(device: str) -> bool:
    kind, _, index = device.partition(":")
    return (device in ("auto", "cpu", "cuda")) or (kind == "cuda" and index.isdigit())


def _validate_shapes(config: TrainConfig):
    """Options that must fit together (the tiny models', the adapters'): one clear error
    here instead of a shape error from deep inside the model."""
    groups = config.adapter.groups          # rank, groups themselves: AdapterConfig's own checks
    pairs = []
    if not config.llama:
        head_dim = config.dim // config.heads
        pairs += [(config.dim % config.heads == 0 and head_dim % 2 == 0,
                   f"--dim {config.dim} must be --heads {config.heads} x an even head size "
                   f"(rotary embeddings rotate pairs)"),
                  (config.dim % groups == 0, f"--groups {groups} must divide --dim {config.dim}")]
    if not config.clip:
        pairs += [(config.clip_dim % 4 == 0, f"--clip-dim must be a multiple of 4 (the tiny CLIP's "
                                             f"heads), got {config.clip_dim}"),
                  (config.clip_dim % groups == 0,
                   f"--groups {groups} must divide --clip-dim {config.clip_dim}"),
                  (config.image_size % config.patch_size == 0,
                   f"--image-size {config.image_size} must be a positive multiple of "
                   f"--patch-size {config.patch_size}")]
    for ok, message in pairs:
        if not ok:
            raise ValueError(message)
